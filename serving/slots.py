"""A loaded version ready to answer (serving/rollout.py's Slot): its model or tokenizer, its
engine (in-process, or an upstream one) and its routes. ``llmops serve`` builds the first
one; a rollout builds the next beside it with the same settings, request log, metrics,
quota and feature store."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from serving.rollout import Slot
from serving.settings import ServeSpec


@dataclass
class Context:
    """What every version loaded by this endpoint shares."""
    cfg: ServeSpec
    catalog: dict
    state_dir: Path
    keys: dict[str, str]
    log: Any  # serving.records.RequestLog | None
    triage: Any  # serving.triage.Triage | None
    metrics: Any  # serving.shared.Metrics
    quota: Any  # serving.quota.Quota


def load(ref: str, weights: str, ctx: Context):
    """Fetch, check and load version ``ref`` (RegistryError, ModelError, ValueError)."""
    from serving.model import ModelRef, load_version

    return load_version(ModelRef.parse(ref), ctx.catalog, ctx.state_dir, weights,
                        tokenizer_only=ctx.cfg.upstream.url is not None)


def build(served, ctx: Context) -> Slot:
    """Start ``served``'s engine and routes (the engine is stopped again if that fails)."""
    from serving.app import create_app
    from serving.engine import Engine

    b = ctx.cfg.batching
    if ctx.cfg.upstream.url is not None:
        from serving.upstream import UpstreamEngine

        engine = UpstreamEngine.from_spec(ctx.cfg.upstream, served.id, served.tokenizer, b.max_queue).start()
        served.variant = "upstream"
    else:
        engine = Engine(served.tokenizer, served.model, b.max_batch_size, b.max_wait_ms, b.max_queue).start()
    try:
        # each version its own answer constraint (built from its tokenizer); the store is shared
        triage = copy.copy(ctx.triage) if ctx.triage is not None else None
        app = create_app(served, engine, ctx.cfg, ctx.keys, ctx.log, triage, ctx.metrics, ctx.quota)
    except Exception:
        engine.stop()
        raise
    return Slot(served, engine, app)


def loader(ctx: Context, name: str) -> Callable[[str, str, str | None], Slot]:
    """``load(ref, weights, alias) -> Slot`` for the rollout's candidates: versions of ``name``
    only (the request log, monitoring and clients' model names belong to one registered
    model). ``alias``: the name clients may also call it by once live (``name@champion``)."""
    from serving.model import ModelRef

    def load_candidate(ref: str, weights: str, alias: str | None = None) -> Slot:
        parsed = ModelRef.parse(ref)
        if parsed.name != name:
            raise ValueError(f"this endpoint serves versions of {name!r}, not {parsed.name!r}")
        if weights not in ("serving", "adapter"):
            raise ValueError(f"weights must be serving or adapter (got {weights!r})")
        served = load(ref, weights, ctx)
        served.alias = alias or served.alias
        return build(served, ctx)
    return load_candidate
