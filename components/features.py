"""features: the feature tables, the article embeddings, `feast apply` and materialization.

The stage writes two feature tables (customer profiles over time; article titles with their
embeddings), publishes them to the feature store's offline source, registers the Feast
repository's definitions and materializes everything into the online store (Milvus Lite by
default), where articles are indexed for vector search. Reading the store (training's
point-in-time features, serving's online features, retrieval) is components/featurestore.py.
"""
from __future__ import annotations

import hashlib
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from components.base import StageIO, StageResult, markdown_table
from components.featurestore import Embedder, FeaturesSpec, feast_state, open_online, open_store
from components.reports import FeaturesReport

OUTPUTS = ("customer_profiles.parquet", "article_embeddings.parquet")


def article_text(title: str, body: str) -> str:
    return f"{title}\n{body}"


def embed_articles(articles: pd.DataFrame, embedder: Embedder, cache: Path, stamp: pd.Timestamp,
                   ) -> tuple[pd.DataFrame, int, int]:
    """The article_embeddings table. Articles whose text hash is in ``cache`` reuse their
    vector; returns (table, embedded, reused) and updates the cache."""
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


# ---------------------------------------------------------------- the stage

def run(cfg: FeaturesSpec, io: StageIO) -> StageResult:
    """Build the feature tables, publish them, register the Feast definitions, materialize."""
    src = io.inputs["validate"]
    profiles = feature_table(pd.read_parquet(src / "customer_profiles.parquet"))
    articles = pd.read_parquet(src / "articles.parquet")
    tickets = pd.read_parquet(src / "tickets.parquet", columns=["created_at"])
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
    online = open_online(io.feature_repo, io.state_dir, io.pipeline, store)  # the feature server's, if one runs
    try:
        online.apply(io.feature_repo)
        start = min(profiles.event_timestamp.min(), stamp).to_pydatetime()
        online.materialize(start, datetime.now(timezone.utc))
    finally:
        online.close()  # releases an in-process Milvus Lite for other processes
    report = FeaturesReport(n_profiles=len(profiles), n_customers=int(profiles.customer_id.nunique()),
                            n_articles=len(table), articles_embedded=embedded, articles_reused=reused)
    rows = [{"table": "customer_profiles", "rows": len(profiles)},
            {"table": "article_embeddings", "rows": len(table)}]
    summary = (f"### features\nFeast registry and online store: `{state}` ({online.where}); {embedded} article(s) "
               f"embedded, {reused} reused (text unchanged).\n\n" + markdown_table(rows))
    return StageResult(outputs=outputs, report=report, summary=summary)


def feature_table(profiles: pd.DataFrame) -> pd.DataFrame:
    """The profile table as Feast's offline source: UTC event times; whole-number float
    columns (how Parquet stores integers with gaps) back to integers, as the views declare."""
    out = profiles.copy()
    out["event_timestamp"] = pd.to_datetime(out.event_timestamp, utc=True)
    for col in out.columns:
        values = out[col].dropna()
        if out[col].dtype.kind == "f" and len(values) and (values == values.round()).all():
            out[col] = out[col].astype("Int64")
    return out


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
