"""`llmops up` / `llmops down`: the local stack (llmops/stack.py) on 127.0.0.1."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from llmops.cli_common import DEFAULT_SPEC, PipelineOpt, SetOpt, SpecFile, _fail, _load, _root, app, console, out


@app.command()
def up(
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    prefect_port: Annotated[int, typer.Option(help="The Prefect server's port (its UI and API).")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="The MLflow UI's port.")] = 5000,
    serve: Annotated[bool, typer.Option(help="Also serve the champion (when there is one).")] = True,
    overrides: SetOpt = None,
) -> None:
    """Start the local stack in the background: a Prefect server with the deployments applied,
    a worker per process pool, the MLflow UI and the endpoint. Running twice is harmless;
    `llmops down` stops it."""
    from llmops.runner import configure_environment
    from llmops.stack import up as stack_up

    spec = _load(file, overrides, pipeline)
    name, _ = spec.pipeline(pipeline)
    if spec.services.prefect.api_url:
        _fail(f"services.prefect.api_url names a Prefect server ({spec.services.prefect.api_url}): `llmops up` "
              "starts a local one; unset PREFECT_API_URL, or use `llmops deployments apply` for that server")
    configure_environment(spec, _root(file))
    try:
        parts = stack_up(spec, _root(file), file, name, prefect_port, mlflow_port, serve,
                         say=lambda line: console.print(escape(line), highlight=False))
    except (RuntimeError, ValueError, OSError) as exc:
        _fail(str(exc), code=1)
    table = Table("part", "state", "where", "log", title=f"local stack of {name}")
    for part in parts:
        table.add_row(part["name"], escape(part["state"]), escape(part.get("url", "-")), escape(part.get("log", "-")))
    out.print(table)
    for part in parts:
        if part.get("reason"):
            out.print(f"{part['name']}: {escape(part['reason'])}")
    api = next(p["api"] for p in parts if p["name"] == "prefect-server")
    out.print(f"Prefect UI: {api.removesuffix('/api')}  (llmops run and llmops monitor use this server while it runs; "
              f"other shells: export PREFECT_API_URL={api})")
    out.print("stop it with `llmops down` (make down)")


@app.command()
def down(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """Stop the local stack `llmops up` started (and the feature server, if one runs)."""
    from components import featureserver
    from llmops.stack import down as stack_down

    spec = _load(file, None, pipeline)
    name, _ = spec.pipeline(pipeline)
    stopped = stack_down(spec, _root(file), say=lambda line: out.print(escape(line), highlight=False))
    feature = featureserver.stop(spec.state_dir(_root(file)), name)
    if feature is not None:
        out.print(f"stopped the feature server (pid {feature['pid']}, {feature['url']})")
    if not stopped and feature is None:
        out.print("nothing was running")
