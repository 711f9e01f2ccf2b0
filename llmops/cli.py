"""The `llmops` command line: run pipelines, single stages, and the tools around them.

Commands live in these modules: this one (run, stage, config, task), cli_models.py (the
model catalog, the registry: list, audit, promote, rollback), cli_data.py (demo data,
Feast, dvc.yaml), cli_traffic.py (data from-traffic: labelled traffic as training data),
cli_serve.py (serve), cli_monitor.py (monitor), cli_deploy.py (deployments) and
cli_stack.py (up, down); cli_common.py holds what they share.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from components.base import StageError
from components.catalog import ModelError
from llmops import (cli_data, cli_deploy, cli_models, cli_monitor, cli_release, cli_serve,  # noqa: F401 - they
                    cli_stack, cli_traffic)  # register their commands on the apps
from llmops.cli_common import (DEFAULT_SPEC, PipelineOpt, SetOpt, SpecFile, _check_services, _fail, _load, _root, app,
                               config_app, console, out, task_app)
from llmops.spec import SpecError


@app.command()
def run(
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    start: Annotated[Optional[str], typer.Option("--from", help="First stage to run (earlier outputs must exist).")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Last stage to run.")] = None,
    overrides: SetOpt = None,
) -> None:
    """Run a pipeline as a Prefect flow (ephemeral local server unless services.prefect.api_url is set)."""
    from llmops.runner import configure_environment, select_stages

    spec = _load(file, overrides, pipeline)
    name, pipe = spec.pipeline(pipeline)
    try:
        stages = select_stages(pipe.stages, start, until)
    except StageError as exc:
        _fail(str(exc))
    configure_environment(spec, _root(file))
    _check_services(prefect=True)
    console.print(f"[bold]pipeline[/] {name}: {' -> '.join(stages)}  (Prefect home: {os.environ['PREFECT_HOME']})")
    from flows.pipeline import pipeline_flow  # after configure_environment: Prefect reads env at import

    started, started_at = time.perf_counter(), time.time()
    try:
        results = pipeline_flow(spec_file=str(file.resolve()), pipeline=name, start=start, until=until,
                                overrides=list(overrides or []))
    except (StageError, ModelError, SpecError) as exc:
        if "gates" in stages:  # a run stopped by its gates shows them before the error
            from llmops.runner import stage_dir

            from components.reports import GateReport

            report = stage_dir(spec, _root(file), name, "gates") / "metrics.json"
            if report.exists() and report.stat().st_mtime >= started_at:
                _print_gates(GateReport.read(report))
        if getattr(exc, "stage_results", None):
            _print_times(exc.stage_results, time.perf_counter() - started)
        _fail(str(exc), code=1)
    outputs = {stage_name: r["outputs"] for stage_name, r in results.items()}
    elapsed = time.perf_counter() - started
    _print_outputs(name, outputs, elapsed)
    _print_headlines(outputs)
    _print_times(results, elapsed)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="Stage to run, e.g. ingest or prepare.")],
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Run one stage directly, without Prefect (this is what dvc.yaml calls)."""
    from llmops.runner import configure_environment, execute_stage

    spec = _load(file, overrides, pipeline)
    pipe_name, pipe = spec.pipeline(pipeline)
    if name not in pipe.stages:
        _fail(f"{name!r} is not a stage of pipeline {pipe_name!r} (stages: {', '.join(pipe.stages)})")
    configure_environment(spec, _root(file))
    _check_services(prefect=False)
    started = time.perf_counter()
    try:
        with console.status(f"stage {name} ({pipe_name}) running..."):
            result = execute_stage(spec, _root(file), pipe_name, name, spec_file=file, overrides=overrides)
    except (StageError, ModelError) as exc:
        _fail(str(exc), code=1)
    _print_outputs(pipe_name, {name: {k: str(v) for k, v in result.outputs.items()}},
                   time.perf_counter() - started, metrics=result.metrics)
    if name == "gates":
        _print_gates(result.report)


def _print_headlines(outputs: dict[str, dict[str, str]]) -> None:
    """The numbers a person looks for after a run: evaluation, compression, gates, the version."""
    from components import reports
    from components.evaluate import by_phrasing
    from components.stats import interval_text, latency_text

    def report(stage: str, kind):
        return kind.read(Path(next(iter(outputs[stage].values()))).parent) if outputs.get(stage) else None

    if (ev := report("evaluate", reports.EvaluationReport)) is not None:
        c, b = ev.candidate, ev.base
        fields = ", ".join(f"{f} {v:.3f}" for f, v in c.field_accuracy.items())
        out.print(f"evaluate: exact match {c.exact_match:.3f} {interval_text(c.exact_match_ci)} (base model "
                  f"{b.exact_match:.3f}; 95% Wilson intervals, n={c.n}), valid {c.json_valid_rate:.3f}, {fields}; "
                  f"latency {latency_text(c.latency())}", highlight=False, soft_wrap=True)
        if phrasing := by_phrasing(ev):
            out.print(f"evaluate: exact match by phrasing: {phrasing}", highlight=False, soft_wrap=True)
    if (cr := report("compress", reports.CompressReport)) is not None:
        v, r = cr.served, cr.served.vs_reference
        out.print(f"compress: chose {cr.chosen}: {v.size_mib} MiB ({100 * r['size_ratio']:.0f}% of "
                  f"{cr.reference}), {v.tokens_per_s_batch1} tokens/s at batch 1 ({r['speedup_batch1']}x), "
                  f"exact match {v.quality.exact_match:.3f} ({100 * r['exact_match_change']:+.1f} pts) on "
                  f"{cr.validation_examples} validation chats", highlight=False, soft_wrap=True)
    if (gr := report("gates", reports.GateReport)) is not None:
        _print_gates(gr)
    if (reg := report("register", reports.RegistrationReport)) is not None:
        gates = f", gates {reg.gates_status}" if reg.gates_status else ""
        out.print(f"register: {reg.model_name} version {reg.version} -> @{reg.alias}{gates} "
                  f"(MLflow {reg.tracking_uri})", highlight=False, soft_wrap=True)
    if (done := report("promote", reports.PromotionReport)) is not None:
        moves = "; ".join(f"@{m['alias']} {m['from'] or '-'} -> {m['to'] or '-'}" for m in done.moves)
        out.print(f"promote: version {done.version} {done.outcome}" + (f" ({moves})" if moves else "")
                  + (f"; failed gates: {', '.join(done.failed_gates)} (mode warn)" if done.failed_gates else ""),
                  highlight=False)
    if (dep := report("deploy", reports.DeployReport)) is not None:
        smoke = dep.numbers.get("smoke")
        checked = (f"; smoke set: {smoke['n']} chats, valid {smoke['json_valid_rate']:.3f}, exact match "
                   f"{smoke['exact_match']:.3f}, p95 {smoke['latency_p95_ms']} ms" if smoke else "")
        out.print(f"deploy: {dep.model_name} version {dep.version} {dep.outcome} on {dep.target}"
                  + (f" at {dep.url}" if dep.url else "") + f" ({dep.strategy}{checked})"
                  + (f"; {dep.reason}" if dep.reason else "")
                  + (f"; was version {dep.previous}" if dep.previous and dep.previous != dep.version else ""),
                  highlight=False, soft_wrap=True)


def _print_gates(report) -> None:
    """The gate report as a table: observed, threshold, margin and result per gate."""
    table = Table("gate", "kind", "metric", "observed", "threshold", "margin", "result", "note",
                  title=f"gates: {report.status} (compared with {report.champion})", title_justify="left")
    for row in report.rows():
        colour = "green" if row["result"] == "pass" else "bold red"
        table.add_row(*(escape(v) for v in list(row.values())[:6]), f"[{colour}]{row['result']}[/]",
                      escape(row["note"][:80]))
    out.print(table)


def _print_times(results: dict[str, dict], elapsed: float) -> None:
    """Each stage's wall time, and the rest (Prefect, MLflow, start-up) as overhead."""
    table = Table("stage", "wall time", "share", title="time per stage", title_justify="left")
    for stage_name, r in results.items():
        table.add_row(stage_name, f"{r['seconds'] / 60:.1f} min", f"{100 * r['seconds'] / elapsed:.0f}%")
    rest = elapsed - sum(r["seconds"] for r in results.values())
    table.add_row("(orchestration)", f"{rest / 60:.1f} min", f"{100 * rest / elapsed:.0f}%")
    table.add_row("total", f"{elapsed / 60:.1f} min", "100%", style="bold")
    out.print(table)


def _print_outputs(pipeline: str, outputs: dict[str, dict[str, str]], seconds: float,
                   metrics: dict | None = None) -> None:
    """One line per output file (stage, name, path): greppable, never wrapped."""
    cwd = Path.cwd()
    out.print(f"{pipeline}: outputs", style="bold")
    for stage_name, files in outputs.items():
        for key, path in files.items():
            shown = Path(path)
            shown = shown.relative_to(cwd) if shown.is_relative_to(cwd) else shown
            out.print(f"  {stage_name:<10} {key:<18} {shown}", highlight=False, soft_wrap=True)
    if metrics:
        out.print("metrics: " + json.dumps(metrics), highlight=False, soft_wrap=True)
    out.print(f"done in {seconds:.1f} s")


# ---------------------------------------------------------------- config

@config_app.command("validate")
def config_validate(file: SpecFile = Path(DEFAULT_SPEC), overrides: SetOpt = None) -> None:
    """Check the spec; prints each problem with its line and key path, exits 2 if any."""
    spec = _load(file, overrides, None)
    for name, pipe in spec.pipelines.items():
        mark = " (default)" if name == spec.default_pipeline else ""
        out.print(f"{file}: OK  pipeline {name}{mark}: {' -> '.join(pipe.stages)}")


@config_app.command("show")
def config_show(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None, overrides: SetOpt = None) -> None:
    """Print the resolved spec: defaults filled in, ${ENV} and --set applied."""
    from llmops.spec import dump

    sys.stdout.write(dump(_load(file, overrides, pipeline)))


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of pipelines.yaml (point your editor's YAML plugin at it)."""
    from llmops.spec import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


# ---------------------------------------------------------------- task

@task_app.command("schema")
def task_schema(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None, overrides: SetOpt = None) -> None:
    """Print the answer's JSON Schema: with the values of table-bound fields (e.g. article
    ids) when prepare has run, else those fields as any string (a note on stderr says so)."""
    from components.task import AnswerSchema
    from llmops.runner import stage_dir

    spec = _load(file, overrides, pipeline)
    name, pipe = spec.pipeline(pipeline)
    written = stage_dir(spec, _root(file), name, "prepare") / AnswerSchema.FILE
    schema = AnswerSchema.of(pipe.task).schema
    if written.exists() and pipe.task.tables():
        from_data = AnswerSchema.read(written).schema
        if set(from_data["properties"]) == set(schema["properties"]):
            schema = from_data
    elif pipe.task.tables():
        console.print(f"note: values of {', '.join(f for f, a in pipe.task.answer.items() if a.values_from)} come "
                      f"from the data; run `llmops run --until prepare` to list them", highlight=False)
    sys.stdout.write(json.dumps(schema, indent=2) + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
