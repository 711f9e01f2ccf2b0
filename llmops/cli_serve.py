"""`llmops serve`: the endpoint for a registered version (see serving/)."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmops.cli_common import DEFAULT_SPEC, ModelOpt, PipelineOpt, SetOpt, SpecFile, _fail, _load, _root, app, console


@app.command()
def serve(
    action: Annotated[Optional[str], typer.Argument(
        help="stop: stop the endpoint the deploy stage started in the background.")] = None,
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    model: ModelOpt = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default: serve.host, 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default: serve.port).")] = None,
    weights: Annotated[str, typer.Option(
        help="serving: the compressed variant the version holds (if any); adapter: base + adapter in "
             "PyTorch fp32 (the uncompressed reference).")] = "serving",
    overrides: SetOpt = None,
) -> None:
    """Serve a registered model version over HTTP (OpenAI-compatible chat completions and
    completions, health, readiness, metrics) until interrupted. With serve.upstream.url set,
    another OpenAI-compatible engine generates and this process is its gateway (only the
    version's tokenizer is loaded)."""
    from components.catalog import ModelError
    from components.registry import RegistryError
    from llmops.runner import configure_environment
    from serving.settings import load_keys

    spec = _load(file, overrides, pipeline)
    name, pipe = spec.pipeline(pipeline)
    cfg = pipe.serve
    root = _root(file)
    if action is not None:
        if action != "stop":
            _fail(f"unknown action {action!r}: `llmops serve` serves; `llmops serve stop` stops the endpoint "
                  "the deploy stage started")
        return _stop(spec.state_dir(root), name)
    configure_environment(spec, root)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        keys = load_keys(cfg, root)
    except ValueError as exc:
        _fail(str(exc))
    from serving.model import ModelRef

    if weights not in ("serving", "adapter"):
        _fail(f"--weights must be serving or adapter (got {weights!r})")
    try:
        ref = ModelRef.parse(model or cfg.model or f"{pipe.register_.model_name}@champion")
    except ValueError as exc:
        _fail(f"--model {exc}")
    upstream = cfg.upstream.url is not None
    from serving import slots

    ctx = slots.Context(cfg, dict(spec.models), spec.state_dir(root), keys, None, None, None, None)
    try:
        with console.status(f"loading {ref}{' (its tokenizer)' if upstream else ''} ..."):
            served = slots.load(str(ref), weights, ctx)
    except (RegistryError, ModelError) as exc:
        _fail(str(exc), code=1)

    import uvicorn

    from serving.quota import Quota
    from serving.records import RequestLog
    from serving.rollout import Switchboard
    from serving.shared import Metrics

    b = cfg.batching
    ctx.metrics = Metrics()
    ctx.quota = Quota(cfg.rate_limits.requests_per_minute, cfg.rate_limits.tokens_per_minute)
    if cfg.request_log.enabled:
        folder = Path(cfg.request_log.folder) if cfg.request_log.folder else \
            spec.state_dir(root) / "serving" / "requests" / served.name
        shipper = None
        if cfg.request_log.s3_uri:
            from serving.records import S3Shipper

            try:
                shipper = S3Shipper(f"{cfg.request_log.s3_uri.rstrip('/')}/{served.name}",
                                    spec.services.storage.s3_endpoint_url, cfg.request_log.upload_every_s)
            except ValueError as exc:
                _fail(str(exc))
        ctx.log = RequestLog(folder if folder.is_absolute() else root / folder, cfg.request_log.max_file_mib,
                             cfg.request_log.max_queue, cfg.request_log.redact_pii, shipper)
    log = ctx.log
    if cfg.triage:
        from serving.triage import open_triage

        with console.status("opening the feature store (starting the feature server if none runs) ..."):
            ctx.triage = open_triage(served.manifest, pipe.features, (root / spec.services.feast.repo).resolve(),
                                     spec.state_dir(root), name, dict(spec.models))
            ctx.triage.constrain = cfg.constrain_answers
    triage = ctx.triage
    try:
        live = slots.build(served, ctx)
    except ValueError as exc:
        _fail(str(exc))
    engine = live.engine
    admin_key = os.environ.get(cfg.admin_key_env) or None
    board = Switchboard(live, slots.loader(ctx, served.name), admin_key)
    bind_host, bind_port = host or cfg.host, port or cfg.port
    if upstream:
        console.print(f"serving {served.id} ({ref}) through {engine.where} (model {engine.model!r}, up to "
                      f"{engine.max_concurrent} requests at once); tokenizer loaded in {served.load_s} s from "
                      f"{served.folder}", highlight=False)
    else:
        console.print(f"serving {served.id} ({ref}, {served.variant}) loaded in {served.load_s} s from "
                      f"{served.folder}", highlight=False)
    console.print(f"  http://{bind_host}:{bind_port}/v1/chat/completions  (/v1/completions /v1/models /health "
                  f"/ready /metrics); API keys: {f'{len(keys)} configured' if keys else 'none needed'}; "
                  + ("" if upstream else f"batches of up to {b.max_batch_size}, ")
                  + f"queue {b.max_queue}; request log: {log.folder if log else 'off'}"
                  f"{f' -> {log.shipper.uri}' if log and log.shipper else ''}",
                  highlight=False)
    console.print(f"  http://{bind_host}:{bind_port}/admin/status  (rollouts: `llmops deploy`); admin calls "
                  + (f"need ${cfg.admin_key_env}" if admin_key else f"from this machine only (${cfg.admin_key_env} "
                                                                        "unset)"), highlight=False)
    if triage is not None:
        from serving.triage import UNCONSTRAINED_UPSTREAM

        console.print(f"  http://{bind_host}:{bind_port}/v1/triage: "
                      + (f"[yellow]{triage.problem}[/yellow]" if triage.problem else
                         f"features and top-{triage.features.top_k} articles {triage.online.where}"
                         + (" (started for this endpoint; stopped when it exits)" if triage.started_server else "")
                         + (f"; {UNCONSTRAINED_UPSTREAM}" if upstream and triage.constrain else
                            f"; {triage.constraint_note}" if triage.constraint_note else "")), highlight=False)
    # uvicorn shuts down gracefully on SIGTERM (systemd, Kubernetes), then raises it again:
    # end as on Ctrl-C, so the cleanup below runs (the request log is flushed, a feature
    # server started for this endpoint stops) instead of the process dying mid-way.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        uvicorn.run(board, host=bind_host, port=bind_port, log_level="warning", access_log=False)
    finally:
        for slot in (board.candidate, board.live):
            if slot is not None:
                slot.engine.stop()
        if log is not None:
            log.close()
        stopped = ""
        if triage is not None and triage.started_server:  # one started for this endpoint goes with it
            from components import featureserver

            featureserver.stop(spec.state_dir(root), name)
            stopped = "; the feature server it started stopped"
        console.print(f"stopped serving {board.live.id}"
                      + (f"; request log: {log.written:,} written, {log.dropped:,} dropped" if log else "")
                      + stopped, highlight=False)


def _stop(state_dir: Path, pipeline: str) -> None:
    from components import background
    from components.deploy.local import record_path

    record = background.stop_recorded(record_path(state_dir, pipeline), timeout_s=60)
    if record is None:
        console.print(f"no endpoint of pipeline {pipeline} was started in the background (nothing to stop; one "
                      "started with `llmops serve` stops with Ctrl-C)", highlight=False)
        return
    console.print(f"stopped the endpoint at {record['url']} (pid {record['pid']}, serving {record['model']} when it "
                  f"started, {record['started']}); log: {record['log']}", highlight=False)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)
