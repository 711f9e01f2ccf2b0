"""The feature store and the vector store, for every part that reads them: the ``features``
stage (apply, materialize), ``prepare`` (features as of each ticket's time, retrieval) and
the endpoint (features now, the same retrieval, the same prompt).

The Feast repository (``feature_repo/``) declares the entities, feature views and feature
services; the spec names the feature service whose features a prompt may use
(``features.feature_service``), so no module lists them. The embedded default keeps the
registry and a Milvus Lite online store (vector-indexed) under the state folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io as _io
import logging
import os
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from components.base import StageError, StrictModel
from components.catalog import ModelError, resolve
from components.task import TaskSpec, build_messages, query_text


class FeaturesSpec(StrictModel):
    embedding_model: str = "all-minilm-l6-v2"  # a model reference; its vectors fill the vector index
    top_k: int = Field(3, gt=0, le=20)  # articles retrieved per request and shown in the prompt
    batch_size: int = Field(64, gt=0)  # texts per embedding batch
    feature_service: str = "triage"  # the Feast feature service whose features prompts may use
    entity_key: str = "customer_id"  # the request field that names the entity those features describe
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


def definitions(repo: Path) -> list:
    """The Feast objects (entities, data sources, feature views, feature services) that the
    repository's Python files define, imported afresh (not from the module cache)."""
    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView
    from feast.data_source import DataSource

    kinds = (Entity, DataSource, FeatureView, OnDemandFeatureView, FeatureService)
    found: list = []
    for path in sorted(repo.glob("*.py")):
        name = f"_feast_repo_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        written, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in the repo
        try:
            spec.loader.exec_module(module)
        finally:
            sys.dont_write_bytecode = written
        found += [obj for obj in vars(module).values() if isinstance(obj, kinds) and not any(obj is f for f in found)]
    return found


def apply(store, repo: Path) -> None:
    """Register the repository's definitions (what `feast apply` does) with the public API."""
    with contextlib.redirect_stdout(_io.StringIO()), warnings.catch_warnings():
        # Feast warns on every apply that on-demand views are "experimental ... does not scale well for
        # offline retrieval"; the flags are two comparisons per row: noise here.
        warnings.filterwarnings("ignore", message="On demand feature view is an experimental feature",
                                category=RuntimeWarning)
        store.apply(definitions(repo))


def materialize(store, start: datetime | None, end: datetime, views: list[str] | None = None) -> None:
    """Load feature values into the online store: [start, end], or incrementally from the
    last materialization when ``start`` is None; all feature views, or ``views``."""
    with contextlib.redirect_stdout(_io.StringIO()):
        if start is None:
            store.materialize_incremental(end_date=end, feature_views=views)
        else:
            store.materialize(start_date=start, end_date=end, feature_views=views)


def feature_service(store, name: str):
    """(the feature service, the names of its features) from the registry; StageError
    naming the services that exist when there is no such service."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        service = store.get_feature_service(name)
    except FeatureServiceNotFoundException:
        known = ", ".join(s.name for s in store.list_feature_services()) or "none"
        raise StageError(f"features.feature_service: no feature service {name!r} in the Feast registry "
                         f"(services: {known}); check feature_repo/ and run `llmops features apply`") from None
    return service, [f.name for p in service.feature_view_projections for f in p.features]


# ---------------------------------------------------------------- embeddings and retrieval

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


class Retriever:
    """Top-k articles for request texts, from the online store's vector index.

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


# ---------------------------------------------------------------- features of a request

def historical_features(store, cfg: FeaturesSpec, requests: pd.DataFrame, time_column: str) -> pd.DataFrame:
    """The feature service's features for each request's entity as of its ``time_column``
    (a point-in-time join: a later change never leaks into an earlier request), in the
    requests' order, one column per feature."""
    service, names = feature_service(store, cfg.feature_service)
    entity_df = pd.DataFrame({cfg.entity_key: requests[cfg.entity_key].astype(str).values,
                              "event_timestamp": pd.to_datetime(requests[time_column], utc=True).values,
                              "_order": range(len(requests))})
    entity_df["event_timestamp"] = pd.to_datetime(entity_df["event_timestamp"], utc=True)
    with contextlib.redirect_stdout(_io.StringIO()):
        joined = store.get_historical_features(entity_df=entity_df, features=service).to_df()
    return joined.sort_values("_order").reset_index(drop=True)[names]


def online_features(store, cfg: FeaturesSpec, entity: str) -> dict[str, Any]:
    """The entity's features now (the online store). An entity the store does not know gets
    None values (``unknown_customer: default``) or a StageError (``error``)."""
    service, names = feature_service(store, cfg.feature_service)
    with contextlib.redirect_stdout(_io.StringIO()):
        row = store.get_online_features(features=service, entity_rows=[{cfg.entity_key: entity}]).to_dict()
    values = {f: row[f][0] for f in names}
    views = {v.name for v in store.list_feature_views()}  # stored views (on-demand ones derive from them)
    stored = [f.name for p in service.feature_view_projections if p.name in views for f in p.features]
    if all(values[f] is None for f in stored or names) and cfg.unknown_customer == "error":
        raise StageError(f"unknown {cfg.entity_key} {entity!r}: no features in the online store")
    return values


def online_context(store, retriever: Retriever | None, cfg: FeaturesSpec, task: TaskSpec, request: dict,
                   ) -> dict[str, Any]:
    """What serving needs for one request: the entity's features now, the top-k articles
    and the chat messages, built by the same function training uses."""
    features = online_features(store, cfg, str(request[cfg.entity_key]))
    articles = retriever.search([query_text(request, task)])[0] if retriever and task.uses_retrieval() else []
    return {"features": features, "articles": articles,
            "messages": build_messages({**request, **features}, task, articles)}
