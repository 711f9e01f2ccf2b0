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
    configure_environment(spec, root)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        keys = load_keys(cfg, root)
    except ValueError as exc:
        _fail(str(exc))
    from serving.model import ModelRef, load_version

    if weights not in ("serving", "adapter"):
        _fail(f"--weights must be serving or adapter (got {weights!r})")
    try:
        ref = ModelRef.parse(model or cfg.model or f"{pipe.register_.model_name}@champion")
    except ValueError as exc:
        _fail(f"--model {exc}")
    upstream = cfg.upstream.url is not None
    try:
        with console.status(f"loading {ref}{' (its tokenizer)' if upstream else ''} ..."):
            served = load_version(ref, spec.models, spec.state_dir(root), weights, tokenizer_only=upstream)
    except (RegistryError, ModelError) as exc:
        _fail(str(exc), code=1)

    import uvicorn

    from serving.app import create_app
    from serving.engine import Engine
    from serving.records import RequestLog

    b = cfg.batching
    if upstream:
        from serving.upstream import UpstreamEngine

        try:
            engine = UpstreamEngine.from_spec(cfg.upstream, served.id, served.tokenizer, b.max_queue).start()
        except ValueError as exc:
            _fail(str(exc))
        served.variant = "upstream"
    else:
        engine = Engine(served.tokenizer, served.model, b.max_batch_size, b.max_wait_ms, b.max_queue).start()
    log = None
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
                engine.stop()
                _fail(str(exc))
        log = RequestLog(folder if folder.is_absolute() else root / folder, cfg.request_log.max_file_mib,
                         cfg.request_log.max_queue, cfg.request_log.redact_pii, shipper)
    triage = None
    if cfg.triage:
        from serving.triage import UNCONSTRAINED_UPSTREAM, open_triage

        with console.status("opening the feature store (starting the feature server if none runs) ..."):
            triage = open_triage(served.manifest, pipe.features, (root / spec.services.feast.repo).resolve(),
                                 spec.state_dir(root), name, dict(spec.models))
            triage.constrain = cfg.constrain_answers
    application = create_app(served, engine, cfg, keys, log, triage)
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
    if triage is not None:
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
        uvicorn.run(application, host=bind_host, port=bind_port, log_level="warning", access_log=False)
    finally:
        engine.stop()
        if log is not None:
            log.close()
        stopped = ""
        if triage is not None and triage.started_server:  # one started for this endpoint goes with it
            from components import featureserver

            featureserver.stop(spec.state_dir(root), name)
            stopped = "; the feature server it started stopped"
        console.print(f"stopped serving {served.id}"
                      + (f"; request log: {log.written:,} written, {log.dropped:,} dropped" if log else "")
                      + stopped, highlight=False)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)
