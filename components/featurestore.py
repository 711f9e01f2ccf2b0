"""The feature store and the vector store, for every part that reads them: the ``features``
stage (apply, materialize), ``prepare`` (features as of each ticket's time, retrieval) and
the endpoint (features now, the same retrieval, the same prompt).

The Feast repository (``feature_repo/``) declares the entities, feature views and feature
services; the spec names the feature service whose features a prompt may use
(``features.feature_service``), so no module lists them. The embedded default keeps the
registry and a Milvus Lite online store (vector-indexed) under the state folder.

Milvus Lite lets one process open the online store. When a feature server runs for the
state folder (``llmops features serve``, components/featureserver.py) it is that one
process, and everyone else (the endpoint, a pipeline run, monitoring) reads, searches,
applies and materializes through it: :func:`open_online` picks the way. The registry and
the offline Parquet files are read directly by every process.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol

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
    # Feast warns that serve_features_while_materializing "typically has no effect" on a file
    # registry; measured with 0.67, it does: without it, reads during a materialization of
    # the view fail ("is in state 'MATERIALIZING' and cannot serve features").
    logging.getLogger("feast.repo_config").addFilter(_serve_while_materializing_note)


def _serve_while_materializing_note(record: logging.LogRecord) -> bool:
    return "serve_features_while_materializing" not in record.getMessage()


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


def apply_here(store, repo: Path) -> None:
    """`feast apply` in this process, with the public API (this process owns the store)."""
    with contextlib.redirect_stdout(_io.StringIO()), warnings.catch_warnings():
        # Feast warns on every apply that on-demand views are "experimental ... does not scale well for
        # offline retrieval"; the flags are two comparisons per row: noise here.
        warnings.filterwarnings("ignore", message="On demand feature view is an experimental feature",
                                category=RuntimeWarning)
        store.apply(definitions(repo))


def feature_service(store, name: str):
    """(the feature service, the names of its features) from the registry; StageError
    naming the services that exist when there is no such service."""
    from feast.errors import FeatureServiceNotFoundException

    try:
        # From the registry cache: a read of the file while another process (the feature
        # server materializing) rewrites it can see no services at all.
        service = store.get_feature_service(name, allow_cache=True)
    except FeatureServiceNotFoundException:
        known = ", ".join(s.name for s in store.list_feature_services()) or "none"
        raise StageError(f"features.feature_service: no feature service {name!r} in the Feast registry "
                         f"(services: {known}); check feature_repo/ and run `llmops features apply`") from None
    return service, [f.name for p in service.feature_view_projections for f in p.features]


# ---------------------------------------------------------------- the online store, here or over HTTP

ARTICLE_VIEW, ARTICLE_KEY = "article_embeddings", "article_id"  # the vector-indexed view and its key


class FeatureStoreUnavailable(StageError):
    """The online store cannot be reached (a feature server down, or its store locked)."""


class Online(Protocol):
    """What reads and writes the online store: :class:`LocalOnline` in the process that owns
    it, or ``components.featureserver.RemoteOnline`` through the feature server that does."""

    where: str

    def read(self, entity_rows: list[dict], features: list[str] | None = None,
             service: str | None = None) -> dict[str, list]: ...

    def search(self, feature: str, vector: list[float], top_k: int) -> list[str]: ...

    def materialize(self, start: datetime | None, end: datetime, views: list[str] | None = None) -> None: ...

    def apply(self, repo: Path) -> None:
        """Register the repository's definitions (what `feast apply` does) where the online
        store is owned: in this process, or in the feature server that owns it."""

    def close(self) -> None: ...


class LocalOnline:
    """The online store opened in this process (Milvus Lite: then no other process can)."""

    where = "in this process"

    def __init__(self, store):
        self.store = store

    def read(self, entity_rows, features=None, service=None):
        wanted = feature_service(self.store, service)[0] if service else features
        with contextlib.redirect_stdout(_io.StringIO()):
            return self.store.get_online_features(features=wanted, entity_rows=entity_rows).to_dict()

    def search(self, feature, vector, top_k):
        with contextlib.redirect_stdout(_io.StringIO()):
            df = self.store.retrieve_online_documents_v2(features=[feature], query=vector, top_k=top_k,
                                                         distance_metric="COSINE").to_df()
        return [str(a) for a in df[ARTICLE_KEY]] if ARTICLE_KEY in df else []

    def materialize(self, start, end, views=None):
        """Load feature values into the online store: [start, end], or incrementally from the
        last materialization when ``start`` is None; all feature views, or ``views``."""
        with contextlib.redirect_stdout(_io.StringIO()):
            if start is None:
                self.store.materialize_incremental(end_date=end, feature_views=views)
            else:
                self.store.materialize(start_date=start, end_date=end, feature_views=views)

    def apply(self, repo):
        apply_here(self.store, repo)

    def close(self) -> None:
        """Release the online store: Milvus Lite runs an in-process server per store file and
        holds the file's lock until this process ends unless it is released here (then a
        feature server, or a later stage, can open it)."""
        backend = self.store._get_provider().online_store  # Feast has no public close
        client = getattr(backend, "client", None)
        if client is None:
            return
        client.close()
        backend.client = None
        getattr(backend, "_collections", {}).clear()
        if hasattr(backend, "_get_db_path"):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(backend._get_db_path(self.store.config))


def open_online(repo: Path, state_dir: Path, pipeline: str, store=None) -> Online:
    """The online store as this process should reach it: through the feature server when one
    is configured (``services.feast.url``, exported as $LLMOPS_FEATURE_SERVER) or running for
    this state folder (``llmops features serve``), else opened here (``store`` or a new one)."""
    from components import featureserver

    remote = featureserver.remote(state_dir, pipeline)
    if remote is not None:
        return remote
    return LocalOnline(store if store is not None else open_store(repo, state_dir, pipeline))


def materialize_until_now(repo: Path, state_dir: Path, pipeline: str) -> str:
    """Load the feature values added since the last materialization (up to now) into the
    online store, wherever it is reached from; returns where."""
    online = open_online(repo, state_dir, pipeline)
    try:
        online.materialize(None, datetime.now(timezone.utc))
    finally:
        online.close()
    return online.where


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
    order but its feature and distance columns in another order (in process and over the
    feature server alike), so only the ranked ids are taken from the search; titles and
    vectors are then read by key and the cosine score is computed here. ``cache`` keeps
    articles read once (a stage's batch); a long-running endpoint reads them each time, so
    a re-materialized article is never served stale.
    """

    def __init__(self, online: Online, embedder: Embedder, top_k: int, cache: bool = True):
        self.online, self.embedder, self.top_k, self.cache = online, embedder, top_k, cache
        self._articles: dict[str, tuple[str, np.ndarray]] = {}

    def search(self, texts: list[str], progress: bool = False) -> list[list[dict]]:
        """Top-k articles for each text; ``progress`` shows a bar (for long batches)."""
        from rich.progress import track

        vectors = self.embedder.encode(texts, progress=progress)
        ranked = []
        for vec in track(vectors, description=f"retrieving top-{self.top_k} articles", disable=not progress,
                         transient=True):
            ranked.append((vec, self.online.search(f"{ARTICLE_VIEW}:title", vec.tolist(), self.top_k)))
        articles = self._articles if self.cache else {}
        self._load({a for _, ids in ranked for a in ids} - set(articles), articles)
        return [[{"article_id": a, "title": articles[a][0],
                  "score": round(float(articles[a][1] @ vec), 4)} for a in ids] for vec, ids in ranked]

    def _load(self, ids: set[str], into: dict) -> None:
        if not ids:
            return
        order = sorted(ids)
        rows = self.online.read([{ARTICLE_KEY: a} for a in order],
                                features=[f"{ARTICLE_VIEW}:title", f"{ARTICLE_VIEW}:embedding"])
        for a, title, emb in zip(rows[ARTICLE_KEY], rows["title"], rows["embedding"]):
            into[a] = (title, np.asarray(emb, dtype=np.float32))


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


def service_fields(store, cfg: FeaturesSpec) -> tuple[list[str], list[str]]:
    """(the feature service's feature names, those of them stored in views rather than
    computed on demand), from the registry: a long-running reader takes them once."""
    service, names = feature_service(store, cfg.feature_service)
    views = {v.name for v in store.list_feature_views(allow_cache=True)}  # on-demand views derive from these
    return names, [f.name for p in service.feature_view_projections if p.name in views for f in p.features]


def online_features(store, online: Online, cfg: FeaturesSpec, entity: str,
                    fields: tuple[list[str], list[str]] | None = None) -> dict[str, Any]:
    """The entity's features now (the online store; ``store`` for the registry, or
    ``fields`` from :func:`service_fields`). An entity the store does not know gets None
    values (``unknown_customer: default``) or a StageError (``error``)."""
    names, stored = fields or service_fields(store, cfg)
    row = online.read([{cfg.entity_key: entity}], service=cfg.feature_service)
    values = {f: row[f][0] for f in names}
    if all(values[f] is None for f in stored or names) and cfg.unknown_customer == "error":
        raise StageError(f"unknown {cfg.entity_key} {entity!r}: no features in the online store")
    return values


def online_context(store, online: Online, retriever: Retriever | None, cfg: FeaturesSpec, task: TaskSpec,
                   request: dict) -> dict[str, Any]:
    """What serving needs for one request: the entity's features now, the top-k articles
    and the chat messages, built by the same function training uses."""
    features = online_features(store, online, cfg, str(request[cfg.entity_key]))
    articles = retriever.search([query_text(request, task)])[0] if retriever and task.uses_retrieval() else []
    return {"features": features, "articles": articles,
            "messages": build_messages({**request, **features}, task, articles)}
