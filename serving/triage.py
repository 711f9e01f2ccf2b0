"""POST /v1/triage: the task endpoint.

A ticket comes in (its fields, e.g. subject, body, channel, customer_id, and optionally the
time to read features as of); the endpoint reads the customer's features from Feast and the
top-k articles from the vector store, builds the prompt with the function training used
(components/task.py ``build_messages``, with the served version's own recorded prompt),
generates a greedy answer constrained to the answers the version's schema allows
(serving/constrain.py; validated only where they cannot be listed, or when an upstream
engine generates: serving/upstream.py), checks it, and returns the parsed answer with the
retrieved articles, the features, the model version and timings. An answer the model gets wrong in form is ``valid: false`` with the
raw text and the schema errors (200), never a 500.

Features come from the online store (now) through the feature server (the one process that
owns the embedded store, components/featureserver.py; `llmops serve` starts it when none
runs), or, when the request gives ``time``, from the offline store as of that time: the
point-in-time join prepare used for training (slower; for replays and audits).
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request as HttpRequest
from pydantic import BaseModel, ConfigDict, Field

from components.base import StageError, plain
from components.featurestore import (Embedder, FeaturesSpec, FeatureStoreUnavailable, Online, Retriever,
                                     historical_features, online_features, service_fields)
from components.task import ARTICLES, TaskSpec, build_messages, query_text, template_fields
from serving.constrain import AnswerConstraint
from serving.protocol import ApiError
from serving.records import elapsed_ms, now_iso

HEALTH_TTL_S = 5.0  # how long a feature-server health answer is trusted by /ready
UNCONSTRAINED_UPSTREAM = ("decoding is not constrained (an upstream engine generates): answers are validated "
                          "against the schema, valid: false with the text when wrong")


class TriageRequest(BaseModel):
    """A ticket: the fields the served prompt template reads (e.g. subject, body, channel)
    and the entity key (e.g. customer_id), as extra fields; ``time``: features as of then."""
    model_config = ConfigDict(extra="allow")
    time: datetime | None = None
    max_tokens: int | None = Field(None, ge=1)


@dataclass
class Triage:
    """A served version's prompt and the stores it reads. ``problem``: why triage cannot
    work at all (e.g. the feature server did not start); /ready and /v1/triage say it."""
    task: TaskSpec
    features: FeaturesSpec
    store: Any = None  # the Feast registry and offline store (read here)
    online: Online | None = None  # the online store (through the feature server)
    retriever: Retriever | None = None
    service: tuple[list[str], list[str]] | None = None  # the feature service's fields, read once
    problem: str | None = None
    started_server: bool = False  # this endpoint started the feature server (and stops it on exit)
    constrain: bool = True  # decode only the answers the schema allows (when they can be listed)
    constraint: AnswerConstraint | None = None
    constraint_note: str | None = None  # what the constraint is, or why there is none
    constraint_for: str | None = None  # the version (name/version) whose tokenizer and schema built it
    _health: tuple[float, str | None] = field(default=(0.0, None))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fields(self) -> list[str]:
        """The request fields a ticket must carry."""
        names = self.service[0]
        wanted = [f for f in template_fields(self.task.user_template) if f != ARTICLES and f not in names]
        if self.task.uses_retrieval():
            wanted += [f for f in self.task.retrieval_query if f not in wanted]
        return [self.features.entity_key] + [f for f in wanted if f != self.features.entity_key]

    def unavailable(self) -> str | None:
        """Why triage cannot answer now (None: it can); the feature server's health is asked
        at most every few seconds."""
        if self.problem or self.online is None or not hasattr(self.online, "healthy"):
            return self.problem
        checked, reason = self._health
        if time.monotonic() - checked > HEALTH_TTL_S:
            with self._lock:
                reason = None if self.online.healthy() else f"the feature store is unreachable: {self.online.where}"
                self._health = (time.monotonic(), reason)
        return reason

    def context(self, ticket: dict, when: datetime | None) -> dict:
        """Features, articles and messages for one ticket (blocking: runs in a thread)."""
        started = time.perf_counter()
        key = self.features.entity_key
        if when is None:
            features = online_features(self.store, self.online, self.features, str(ticket[key]), self.service)
        else:
            frame = pd.DataFrame({key: [str(ticket[key])], "_as_of": [pd.Timestamp(when)]})
            row = historical_features(self.store, self.features, frame, "_as_of").iloc[0].to_dict()
            features = {k: plain(v) for k, v in row.items()}
        features_ms = elapsed_ms(started)
        started = time.perf_counter()
        articles = (self.retriever.search([query_text(ticket, self.task)])[0]
                    if self.retriever is not None and self.task.uses_retrieval() else [])
        return {"features": features, "articles": articles, "features_ms": features_ms,
                "retrieval_ms": elapsed_ms(started),
                "messages": build_messages({**ticket, **features}, self.task, articles)}


def open_triage(manifest: dict, current: FeaturesSpec, repo: Path, state_dir: Path, pipeline: str,
                models: dict, start_server: bool = True) -> Triage:
    """The version's prompt (as registered) over the project's stores. The feature server is
    started when none runs (``start_server``); a failure becomes ``Triage.problem``."""
    from components import featureserver
    from components.featurestore import open_store

    prompt = manifest.get("prompt", {})
    task = TaskSpec(system_prompt=prompt.get("system_prompt") or TaskSpec().system_prompt,
                    user_template=prompt.get("user_template") or TaskSpec().user_template,
                    retrieval_query=prompt.get("retrieval_query") or TaskSpec().retrieval_query)
    cfg = current.model_copy(update={k: prompt[k] for k in ("top_k", "embedding_model", "feature_service")
                                     if prompt.get(k)})
    triage = Triage(task, cfg)
    try:
        triage.store = open_store(repo, state_dir, pipeline)  # the registry: no server for a store never built
        online = featureserver.remote(state_dir, pipeline)
        if online is None and start_server:
            _, triage.started_server = featureserver.start(repo, state_dir, pipeline)
            online = featureserver.remote(state_dir, pipeline)
        if online is None:
            raise FeatureStoreUnavailable("no feature server runs for the state folder; start one with "
                                          "`llmops features serve`")
        triage.online = online
        triage.service = service_fields(triage.store, cfg)  # StageError when the service does not exist
        if task.uses_retrieval():
            triage.retriever = Retriever(online, Embedder(cfg.embedding_model, models, state_dir, cfg.batch_size),
                                         cfg.top_k, cache=False)
    except StageError as exc:
        triage.problem = f"triage is unavailable: {exc}"
    return triage


def add_route(app: FastAPI, shared, triage: Triage) -> None:
    """Register POST /v1/triage on ``app`` (``shared``: serving.shared.Shared)."""
    served, spec, log = shared.served, shared.spec, shared.log
    remote = shared.engine.remote  # the constraint is a logits processor: the in-process engine's only
    if triage.constrain and not remote and triage.constraint_for != served.id:  # built once per version
        triage.constraint_for = served.id
        try:
            triage.constraint = AnswerConstraint.build(served.tokenizer, served.schema)
            triage.constraint_note = f"decoding constrained to the schema's {triage.constraint.answers:,} answers"
        except ValueError as exc:
            triage.constraint, triage.constraint_note = None, str(exc)
    constraint = None if remote else triage.constraint

    @app.post("/v1/triage")
    async def triage_route(body: TriageRequest, request: HttpRequest):
        started, request_id = time.perf_counter(), f"triage-{uuid.uuid4().hex}"
        record: dict[str, Any] = {"request_id": request_id, "route": "/v1/triage",
                                  "key_id": getattr(request.state, "key_id", None), "model": served.id,
                                  "variant": served.variant,
                                  "features_as_of": body.time.isoformat() if body.time else None}

        def logged(status: int, error: str | None = None, **values) -> None:
            if log is not None:
                log.append(record | values | {"time": now_iso(), "latency_ms": elapsed_ms(started),
                                              "status": status, "error": error})

        reason = triage.unavailable()
        if reason:
            logged(503, reason)
            raise ApiError(503, reason, kind="service_unavailable", code="feature_store_unavailable",
                           headers={"Retry-After": "5"})
        ticket = {k: v for k, v in (body.model_extra or {}).items()}
        record["ticket"] = ticket
        missing = [f for f in triage.fields() if ticket.get(f) in (None, "")]
        if missing:
            raise ApiError(422, f"the ticket lacks {', '.join(missing)} (the served prompt reads "
                                f"{', '.join(triage.fields())})", param=missing[0], code="missing_field")
        bad = [k for k, v in ticket.items() if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise ApiError(422, f"{bad[0]}: ticket fields must be strings or numbers", param=bad[0])
        try:
            ctx = await asyncio.to_thread(triage.context, ticket, body.time)
        except FeatureStoreUnavailable as exc:
            triage._health = (time.monotonic(), f"the feature store is unreachable: {triage.online.where}")
            logged(503, str(exc))
            raise ApiError(503, f"the feature store is unavailable: {exc}", kind="service_unavailable",
                           code="feature_store_unavailable", headers={"Retry-After": "5"}) from None
        except StageError as exc:  # e.g. an unknown customer with features.unknown_customer: error
            logged(422, str(exc))
            raise ApiError(422, str(exc), param=triage.features.entity_key, code="unknown_entity") from None
        ids, text = shared.prompt(ctx["messages"])
        max_tokens = body.max_tokens or spec.limits.default_max_tokens
        shared.check_max_tokens(max_tokens)
        shared.check_prompt(ids, request.state.caller, "body")
        record |= {"messages": ctx["messages"], "prompt_tokens": len(ids),
                   "articles": [{"article_id": a["article_id"], "score": a["score"]} for a in ctx["articles"]]}
        gen = shared.start(ids, max_tokens, json_only=True, constraint=constraint, text=text)
        try:
            done = await shared.wait(gen)
        except ApiError as exc:
            logged(exc.status, exc.message)
            raise
        shared.settle(gen, done, request.state.caller)
        answer = served.schema.parse(done.text)
        errors = [] if answer is not None else served.schema.errors(done.text)
        logged(200, answer=done.text, valid=answer is not None, completion_tokens=done.completion_tokens,
               finish_reason=done.finish_reason, cached=gen.hit is not None, batch_size=done.batch_size)
        return {"id": request_id, "object": "triage", "created": int(time.time()), "model": served.id,
                "variant": served.variant, "valid": answer is not None, "answer": answer, "text": done.text,
                "errors": errors, "constrained": constraint is not None, "articles": ctx["articles"], "features": ctx["features"],
                "features_as_of": body.time.isoformat() if body.time else "now", "cached": gen.hit is not None,
                "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                          "total_tokens": done.prompt_tokens + done.completion_tokens},
                "timings_ms": {"features": ctx["features_ms"], "retrieval": ctx["retrieval_ms"],
                               "queue": round(1000 * done.queued_s, 1),
                               "generate": round(1000 * (done.total_s - done.queued_s), 1),
                               "total": elapsed_ms(started)}}
