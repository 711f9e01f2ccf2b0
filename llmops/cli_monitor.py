"""`llmops monitor`: drift of the endpoint's live traffic against the served version's
training prompts (components/monitor, run as the Prefect flow in flows/monitor.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from components.base import StageError
from llmops.cli_common import (DEFAULT_SPEC, ModelOpt, PipelineOpt, SetOpt, SpecFile, _check_services, _fail, _load,
                               _root, app, out)


@app.command()
def monitor(
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    model: ModelOpt = None,
    last: Annotated[Optional[int], typer.Option("--last", help="Window: the newest N requests "
                                                                "(monitor.window.last_requests).", min=1)] = None,
    hours: Annotated[Optional[float], typer.Option("--hours", help="Window: the last H hours "
                                                                    "(monitor.window.hours).")] = None,
    fail_on_drift: Annotated[bool, typer.Option(
        "--fail-on-drift", help="Exit with 3 when a signal drifts (for cron jobs and CI).")] = False,
    overrides: SetOpt = None,
) -> None:
    """Compare a window of the request log with the served version's training prompts:
    token, embedding, answer and operations signals; an Evidently HTML report; alerts on
    the spec's channels (with cooldown) and a Prefect event per alert."""
    from components.catalog import ModelError
    from components.registry import RegistryError
    from llmops.runner import configure_environment

    overrides = list(overrides or [])  # keys relative to the pipeline, as --set takes them
    if last is not None:
        overrides.append(f"monitor.window.last_requests={last}")
    if hours is not None:
        overrides.append(f"monitor.window.hours={hours}")
    spec = _load(file, overrides, pipeline)
    name, _ = spec.pipeline(pipeline)
    configure_environment(spec, _root(file))
    _check_services(prefect=True)
    from flows.monitor import monitor_flow  # after configure_environment: Prefect reads env at import

    try:
        result = monitor_flow(spec_file=str(file.resolve()), pipeline=name, model=model, overrides=overrides)
    except (StageError, ModelError, RegistryError) as exc:
        _fail(str(exc), code=1)
    summary, alerts = result["summary"], result["alerts"]
    print_summary(summary, alerts)
    if fail_on_drift and summary["drifted"]:
        raise typer.Exit(3)


def print_summary(summary: dict, alerts: dict) -> None:
    w = summary["window"]
    out.print(f"[bold]{summary['model']}[/]: {w['requests']:,} requests ({w['first']} .. {w['last']}) "
              f"vs {summary['reference']['prompts']:,} {summary['reference']['split']} prompts "
              f"(SHA-256 {summary['reference']['sha256'][:12]}...)", highlight=False)
    if w["corrupt_lines"]:
        out.print(f"skipped {w['corrupt_lines']} corrupt log lines, e.g. {escape(w['corrupt_examples'][0])}")
    if w["other_versions"]:
        out.print("not compared (other versions): " + ", ".join(f"{k}: {v}" for k, v in w["other_versions"].items())
                  + ("; monitor one of them with --model NAME/VERSION" if not w["requests"] else ""))
    table = Table("signal", "value", "threshold", "chance", "requests", "drift", "detail", title_justify="left",
                  title=f"drift signals ({summary['seconds']} s)")
    style = {"drift": "bold red", "ok": "green", "not enough data": "yellow"}
    for s in summary["signals"]:
        below = s["name"] in ("answer_validity", "retrieval_similarity")
        verdict = {"drift": "yes", "ok": "no"}.get(s["status"], s["status"])
        table.add_row(s["name"], _number(s["value"]), f"{'<' if below else '>'} {_number(s['threshold'])}",
                      _number(s.get("chance")), f"{s['n']:,}", f"[{style[s['status']]}]{verdict}[/]",
                      escape(s["detail"]))
    out.print(table)
    out.print(f"report: {summary['report'] or '(none: no signal had enough data)'}")
    out.print(f"summary: {Path(summary['folder']) / 'summary.json'}; MLflow run {summary.get('mlflow_run_id')}")
    for line in alerts["sent"]:
        out.print(f"alert sent: {line}")
    for line in alerts["failed"]:
        out.print(f"[red]alert failed[/]: {escape(line)}")
    for line in alerts["skipped"]:
        out.print(f"alert channel skipped: {escape(line)}")
    if alerts["suppressed"]:
        out.print(f"still drifting, within the cooldown (no new alert): {', '.join(alerts['suppressed'])}")
    if not summary["drifted"]:
        out.print("no drift" + (" (some signals had not enough data)" if any(
            s["status"] == "not enough data" for s in summary["signals"]) else ""))


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
