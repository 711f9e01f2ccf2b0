"""features: Feast feature tables, article embeddings, and the lookups prompts are built from.

The stage writes two feature tables (customer profiles over time; article titles with
their all-MiniLM-L6-v2 embeddings), publishes them to the feature store's offline source,
runs ``feast apply`` and materializes them into the online store (Milvus Lite by
default), where articles are indexed for vector search.

The same store then serves both sides of the model, through one prompt builder:
- training (``prepare``): profile *as of each ticket's time* (``get_historical_features``)
  and the top-k articles for the ticket's text (``retrieve_online_documents_v2``);
- serving (:func:`online_context`): the profile now (``get_online_features``) and the
  same retrieval, rendered with the same template.
"""
from __future__ import annotations

import contextlib
import io as _io
import logging
import os
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from components.base import StageError, StageIO, StageResult, StrictModel, markdown_table
from components.models import ModelError, resolve

OUTPUTS = ("customer_profiles.parquet", "article_embeddings.parquet")
PROFILE_FEATURES = ("plan", "tenure_days", "open_tickets_30d", "seats")  # stored in customer_profile
FLAG_FEATURES = ("new_customer", "busy_account")  # on-demand view customer_flags, computed from the profile
SERVED_FEATURES = PROFILE_FEATURES + FLAG_FEATURES  # what prompts can show about a customer
FEATURE_REFS = ([f"customer_profile:{f}" for f in PROFILE_FEATURES]
                + [f"customer_flags:{f}" for f in FLAG_FEATURES])
EMBEDDING_DIM = 384


class FeaturesSpec(StrictModel):
    embedding_model: str = "all-minilm-l6-v2"  # a model reference; its vectors fill the vector index
    top_k: int = Field(3, gt=0, le=20)  # articles retrieved per ticket and shown in the prompt
    batch_size: int = Field(64, gt=0)  # texts per embedding batch
    unknown_customer: Literal["error", "default"] = "default"  # serving: fail, or use "unknown" values


# ---------------------------------------------------------------- the store

def feast_state(state_dir: Path, pipeline: str) -> Path:
    return state_dir / "feast" / pipeline


def open_store(repo: Path, state_dir: Path, pipeline: str, require_registry: bool = True):
    """A FeatureStore over ``repo`` with its registry, online store and offline files in the
    state folder. Raises StageError when the registry is missing and ``require_registry``."""
    state = feast_state(state_dir, pipeline)
    os.environ["LLMOPS_FEAST_STATE"] = str(state)
    os.environ["LLMOPS_FEAST_OFFLINE"] = str(state / "offline")
    if not (repo / "feature_store.yaml").exists():
        raise StageError(f"services.feast.repo: {repo} has no feature_store.yaml")
    if require_registry and not (state / "registry.db").exists():
        raise StageError(f"no Feast registry in {state}; run `llmops features apply` "
                         "(or the `features` stage) first")
    _quiet_feast()
    from feast import FeatureStore

    state.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(repo))


def _quiet_feast() -> None:
    for name in ("feast", "milvus_lite", "pymilvus"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Milvus Lite answers some client calls with "not implemented" and logs it; harmless.
    logging.getLogger("grpc._server").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*shadows an attribute in parent.*")


def apply(store, repo: Path) -> None:
    """`feast apply` for ``repo`` (entities, feature views, feature service)."""
    from feast.repo_config import load_repo_config
    from feast.repo_operations import apply_total

    import sys

    config = load_repo_config(repo, repo / "feature_store.yaml")
    # Feast imports the repo's .py files by module name, as its CLI does from inside the repo.
    # A module cached by an earlier apply (another repo copy or state folder) would bring
    # that apply's source paths along, so the repo's module names are imported afresh.
    for stem in {p.stem for p in repo.glob("*.py")}:
        sys.modules.pop(stem, None)
    cwd, sys_path = os.getcwd(), list(sys.path)
    try:
        os.chdir(repo)
        sys.path.insert(0, str(repo))
        with contextlib.redirect_stdout(_io.StringIO()), warnings.catch_warnings():
            # Feast warns on every apply that on-demand views are "experimental ... does not scale
            # well for offline retrieval"; customer_flags is two comparisons per row: noise here.
            warnings.filterwarnings("ignore", message="On demand feature view is an experimental feature",
                                    category=RuntimeWarning)
            apply_total(config, repo, skip_source_validation=True)
    finally:
        os.chdir(cwd)
        sys.path[:] = sys_path


def materialize(store, start: datetime | None, end: datetime, views: list[str] | None = None) -> None:
    """Load feature values into the online store: [start, end], or incrementally from the
    last materialization when ``start`` is None; all feature views, or ``views``."""
    with contextlib.redirect_stdout(_io.StringIO()):
        if start is None:
            store.materialize_incremental(end_date=end, feature_views=views)
        else:
            store.materialize(start_date=start, end_date=end, feature_views=views)


# ---------------------------------------------------------------- embeddings

class Embedder:
    """Sentence embeddings (L2-normalised) with a local sentence-transformers model."""

    def __init__(self, ref: str, models: dict, state_dir: Path, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        try:
            path = resolve(ref, models, state_dir)
        except ModelError as exc:
            raise StageError(f"features.embedding_model: {exc}") from exc
        self.model = SentenceTransformer(path, device="cpu", trust_remote_code=False)
        self.batch_size = batch_size

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress).astype(np.float32)


def article_text(title: str, body: str) -> str:
    return f"{title}\n{body}"


def embed_articles(articles: pd.DataFrame, embedder: Embedder, cache: Path, stamp: pd.Timestamp,
                   ) -> tuple[pd.DataFrame, int, int]:
    """The article_embeddings table. Articles whose text hash is in ``cache`` reuse their
    vector; returns (table, embedded, reused) and updates the cache."""
    import hashlib

    texts = [article_text(t, b) for t, b in zip(articles.title, articles.body)]
    hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    known: dict[str, np.ndarray] = {}
    if cache.exists():
        old = pd.read_parquet(cache)
        known = dict(zip(old.text_sha256, old.embedding))
    todo = [i for i, h in enumerate(hashes) if h not in known]
    if todo:
        vectors = embedder.encode([texts[i] for i in todo])
        for i, vec in zip(todo, vectors):
            known[hashes[i]] = vec
    table = pd.DataFrame({
        "article_id": articles.article_id.astype(str).values,
        "event_timestamp": stamp,
        "title": articles.title.astype(str).values,
        "text_sha256": hashes,
        "embedding": [np.asarray(known[h], dtype=np.float32) for h in hashes],
    })
    cache.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"text_sha256": list(known), "embedding": list(known.values())}).to_parquet(cache, index=False)
    return table, len(todo), len(hashes) - len(todo)


# ---------------------------------------------------------------- lookups

class Retriever:
    """Top-k articles for ticket texts, from the online store's vector index.

    Feast 0.67's Milvus ``retrieve_online_documents_v2`` returns the entity ids in rank
    order but its feature and distance columns in another order, so only the ranked ids
    are taken from the search; titles and vectors are then read by key
    (``get_online_features``, cached per article) and the cosine score is computed here.
    """

    def __init__(self, store, embedder: Embedder, top_k: int):
        self.store, self.embedder, self.top_k = store, embedder, top_k
        self._articles: dict[str, tuple[str, np.ndarray]] = {}

    def search(self, texts: list[str], progress: bool = False) -> list[list[dict]]:
        """Top-k articles for each text; ``progress`` shows a bar (for long batches)."""
        from rich.progress import track

        vectors = self.embedder.encode(texts, progress=progress)
        ranked = []
        for vec in track(vectors, description=f"retrieving top-{self.top_k} articles", disable=not progress,
                         transient=True):
            with contextlib.redirect_stdout(_io.StringIO()):
                df = self.store.retrieve_online_documents_v2(
                    features=["article_embeddings:title"], query=vec.tolist(), top_k=self.top_k,
                    distance_metric="COSINE").to_df()
            ranked.append((vec, [str(a) for a in df.article_id] if "article_id" in df else []))
        self._load({a for _, ids in ranked for a in ids} - set(self._articles))
        return [[{"article_id": a, "title": self._articles[a][0],
                  "score": round(float(self._articles[a][1] @ vec), 4)} for a in ids] for vec, ids in ranked]

    def _load(self, ids: set[str]) -> None:
        if not ids:
            return
        order = sorted(ids)
        with contextlib.redirect_stdout(_io.StringIO()):
            rows = self.store.get_online_features(
                features=["article_embeddings:title", "article_embeddings:embedding"],
                entity_rows=[{"article_id": a} for a in order]).to_dict()
        for a, title, emb in zip(rows["article_id"], rows["title"], rows["embedding"]):
            self._articles[a] = (title, np.asarray(emb, dtype=np.float32))


def historical_profiles(store, tickets: pd.DataFrame) -> pd.DataFrame:
    """Profile features of each ticket's customer as of the ticket's ``created_at``
    (point-in-time join), in the tickets' order."""
    entity_df = pd.DataFrame({"customer_id": tickets.customer_id.astype(str).values,
                              "event_timestamp": pd.to_datetime(tickets.created_at, utc=True).values,
                              "_order": range(len(tickets))})
    entity_df["event_timestamp"] = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    with contextlib.redirect_stdout(_io.StringIO()):
        joined = store.get_historical_features(
            entity_df=entity_df, features=FEATURE_REFS).to_df()
    return joined.sort_values("_order").reset_index(drop=True)[list(SERVED_FEATURES)]


def online_profile(store, customer_id: str, unknown: str = "default") -> dict[str, Any]:
    """The customer's latest materialized profile. An unknown customer gets "unknown"
    values (``unknown="default"``) or raises StageError (``unknown="error"``)."""
    with contextlib.redirect_stdout(_io.StringIO()):
        row = store.get_online_features(features=FEATURE_REFS, entity_rows=[{"customer_id": customer_id}]).to_dict()
    profile = {f: row[f][0] for f in SERVED_FEATURES}
    if all(profile[f] is None for f in PROFILE_FEATURES) and unknown == "error":
        raise StageError(f"unknown customer {customer_id!r}: no profile in the online store")
    return profile


def online_context(store, retriever: Retriever, features_cfg: FeaturesSpec, prepare_cfg, ticket: dict,
                   ) -> dict[str, Any]:
    """What serving needs for one ticket: the customer's online profile, the top-k articles
    and the chat messages, built by the same function training uses."""
    from components.prepare import build_messages, ticket_text

    profile = online_profile(store, str(ticket["customer_id"]), features_cfg.unknown_customer)
    articles = retriever.search([ticket_text(ticket)])[0]
    return {"profile": profile, "articles": articles,
            "messages": build_messages({**ticket, **profile}, prepare_cfg, articles)}


# ---------------------------------------------------------------- the stage

def run(cfg: FeaturesSpec, io: StageIO) -> StageResult:
    """Build the feature tables, publish them, `feast apply`, materialize everything."""
    src = io.inputs["validate"]
    profiles = pd.read_parquet(src / "customer_profiles.parquet")
    articles = pd.read_parquet(src / "articles.parquet")
    tickets = pd.read_parquet(src / "tickets.parquet", columns=["created_at"])
    profiles = profiles[["customer_id", "event_timestamp", *PROFILE_FEATURES]].copy()
    profiles["event_timestamp"] = pd.to_datetime(profiles.event_timestamp, utc=True)
    for col in PROFILE_FEATURES[1:]:
        profiles[col] = profiles[col].astype("int64")
    state = feast_state(io.state_dir, io.pipeline)
    outputs = {"customer_profiles": io.out_dir / "customer_profiles.parquet",
               "article_embeddings": io.out_dir / "article_embeddings.parquet"}
    profiles.to_parquet(outputs["customer_profiles"], index=False)
    publish({"customer_profiles": outputs["customer_profiles"]}, state)
    embedder = Embedder(cfg.embedding_model, io.models, io.state_dir, cfg.batch_size)
    table, embedded, reused = embed_and_publish(articles, tickets.created_at, embedder, state,
                                                outputs["article_embeddings"])
    stamp = table.event_timestamp.max()
    store = open_store(io.feature_repo, io.state_dir, io.pipeline, require_registry=False)
    apply(store, io.feature_repo)
    start = min(profiles.event_timestamp.min(), stamp).to_pydatetime()
    materialize(store, start, datetime.now(timezone.utc))
    metrics = {"n_profiles": int(len(profiles)), "n_customers": int(profiles.customer_id.nunique()),
               "n_articles": int(len(table)), "articles_embedded": embedded, "articles_reused": reused}
    rows = [{"table": "customer_profiles", "rows": len(profiles)},
            {"table": "article_embeddings", "rows": len(table)}]
    summary = (f"### features\nFeast registry and online store: `{state}`; {embedded} article(s) embedded, "
               f"{reused} reused (text unchanged).\n\n" + markdown_table(rows))
    return StageResult(outputs=outputs, metrics=metrics, summary=summary)


def embed_and_publish(articles: pd.DataFrame, ticket_times: pd.Series, embedder: Embedder, state: Path,
                      target: Path) -> tuple[pd.DataFrame, int, int]:
    """Embed ``articles`` (reusing cached vectors of unchanged texts), write the table to
    ``target`` and publish it; returns (table, embedded, reused)."""
    # Articles carry no time; stamp them with the data's last ticket time, which is
    # deterministic (the same data gives the same file) and not after "now".
    stamp = pd.to_datetime(ticket_times, utc=True).max()
    table, embedded, reused = embed_articles(articles, embedder, state / "embedding_cache.parquet", stamp)
    target.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(target, index=False)
    publish({"article_embeddings": target}, state)
    return table, embedded, reused


def publish(outputs: dict[str, Path], state: Path) -> None:
    """Copy the feature tables to the store's offline source (a warehouse, scaled out)."""
    offline = state / "offline"
    offline.mkdir(parents=True, exist_ok=True)
    for path in outputs.values():
        shutil.copy2(path, offline / path.name)
