"""`llmops deployments show | apply | list`: the pipeline's scheduled Prefect deployments
(flows/deployments.py) on the Prefect server of ``services.prefect.api_url``."""
from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from llmops.cli_common import DEFAULT_SPEC, PipelineOpt, SetOpt, SpecFile, _check_services, _fail, _load, _root, app, out

deployments_app = typer.Typer(help="Scheduled Prefect deployments (retrain, monitor, materialize) and their work "
                                   "pools, declared in pipelines.yaml.", no_args_is_help=True)
app.add_typer(deployments_app, name="deployments")


def _server(file: Path, overrides, pipeline):
    """The spec, pipeline name and root, with Prefect pointed at a real server (deployments
    on the ephemeral one would vanish with it and no worker could reach them)."""
    from llmops.runner import configure_environment

    spec = _load(file, overrides, pipeline)
    name, _ = spec.pipeline(pipeline)
    configure_environment(spec, _root(file))
    if not os.environ.get("PREFECT_API_URL"):
        _fail("deployments live on a Prefect server: set PREFECT_API_URL (services.prefect.api_url), e.g. "
              "http://127.0.0.1:4200/api; `make up` starts one with a worker", code=1)
    _check_services(prefect=True)
    return spec, name


def _schedule(d) -> str:
    if not d.cron:
        return "-"
    return f"{d.cron} {d.timezone}" + ("" if d.active else " (paused)")


def _trigger(t) -> str:
    delay = t.schedule_after.total_seconds() / 60
    return (f"on {', '.join(sorted(t.expect))}" + (f", after {delay:g} min" if delay else "")
            + ("" if t.enabled else " (off)"))


@deployments_app.command("show")
def show(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None, overrides: SetOpt = None) -> None:
    """The deployments the spec declares (no server needed): what `apply` registers."""
    from flows.deployments import declare, source_folder

    spec = _load(file, overrides, pipeline)
    name, pipe = spec.pipeline(pipeline)
    table = Table("deployment", "pool", "schedule", "triggers", "overrides", title=f"{name}: deployments")
    for d in declare(spec, _root(file), file, name):
        table.add_row(d.full_name, d.pool, _schedule(d), "; ".join(_trigger(t) for t in d.triggers) or "-",
                      escape(" ".join(d.parameters.get("overrides") or []) or "-"))
    out.print(table)
    pools = ", ".join(f"{n} ({p.type}" + (f", {p.concurrency} at once" if p.concurrency else "") + ")"
                      for n, p in pipe.deployments.pools.items())
    out.print(f"work pools: {pools}; code on the workers: {source_folder(spec, _root(file), name)}")


@deployments_app.command("apply")
def apply(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None, overrides: SetOpt = None) -> None:
    """Create or update the work pools and deployments on the Prefect server (idempotent)."""
    from flows.deployments import apply as apply_all

    spec, name = _server(file, overrides, pipeline)
    try:
        applied = apply_all(spec, _root(file), file, name, say=out.print)
    except (ValueError, OSError) as exc:
        _fail(str(exc), code=1)
    table = Table("deployment", "pool", "schedule", "triggers", "id", title=f"applied to {os.environ['PREFECT_API_URL']}")
    for d, deployment_id in applied:
        table.add_row(d.full_name, d.pool, _schedule(d), "; ".join(_trigger(t) for t in d.triggers) or "-",
                      deployment_id)
    out.print(table)
    pools = sorted({d.pool for d, _ in applied})
    out.print("runs start when a worker polls their pool: " + "; ".join(f"prefect worker start --pool {p}" for p in pools))


@deployments_app.command("list")
def list_(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """The project's deployments on the server: pool, schedules, triggers, next and last run."""
    from flows.deployments import server_view

    spec, name = _server(file, None, pipeline)
    rows = server_view(name)
    if not rows:
        _fail(f"no deployments of {name} on {os.environ['PREFECT_API_URL']}: run `llmops deployments apply`", code=1)
    table = Table("deployment", "pool", "schedule", "triggers", "next run", "last run",
                  title=f"{name}: deployments on {os.environ['PREFECT_API_URL']}")
    for row in rows:
        table.add_row(*(escape(str(row[k])) for k in ("name", "pool", "schedule", "triggers", "next", "last")))
    out.print(table)
