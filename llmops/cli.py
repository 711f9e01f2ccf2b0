"""The `llmops` command line: run pipelines, single stages, and the tools around them."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from components.base import StageError
from components.models import ModelError
from llmops.spec import DEFAULT_SPEC, SpecError, Spec, load_spec

app = typer.Typer(help="Declarative LLMOps: one spec (pipelines.yaml) from raw data to a monitored endpoint.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Check, show and describe pipelines.yaml.", no_args_is_help=True)
models_app = typer.Typer(help="Registered model versions (list, audit) and the spec's `models` catalog "
                              "(pull, catalog).", no_args_is_help=True)
data_app = typer.Typer(help="Demo data: generate support tickets, customers and articles.", no_args_is_help=True)
dvc_app = typer.Typer(help="Keep dvc.yaml in step with pipelines.yaml.", no_args_is_help=True)
features_app = typer.Typer(help="Feast: register definitions, embed articles, load the online store.",
                           no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(dvc_app, name="dvc")
app.add_typer(features_app, name="features")

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

SpecFile = Annotated[Path, typer.Option("--file", "-f", envvar="LLMOPS_SPEC",
                                        help="The spec file.", show_default=True)]
PipelineOpt = Annotated[Optional[str], typer.Option("--pipeline", "-p",
                                                    help="Pipeline to use (default: the spec's default_pipeline).")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a spec key, e.g. --set prepare.split.train=0.7 (relative to the pipeline) "
                  "or --set services.storage.state_dir=/tmp/state. Repeatable.")]


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _load(file: Path, overrides: list[str] | None, pipeline: str | None) -> Spec:
    try:
        return load_spec(file, overrides or [], pipeline)
    except SpecError as exc:
        _fail(str(exc))


def _root(file: Path) -> Path:
    return file.resolve().parent


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
    console.print(f"[bold]pipeline[/] {name}: {' -> '.join(stages)}  (Prefect home: {os.environ['PREFECT_HOME']})")
    from flows.pipeline import pipeline_flow  # after configure_environment: Prefect reads env at import

    started, started_at = time.perf_counter(), time.time()
    try:
        outputs = pipeline_flow(spec_file=str(file.resolve()), pipeline=name, start=start, until=until,
                                overrides=list(overrides or []))
    except (StageError, ModelError, SpecError) as exc:
        if "gates" in stages:  # a run stopped by its gates shows them before the error
            from llmops.runner import stage_dir

            report = stage_dir(spec, _root(file), name, "gates") / "report.json"
            if report.exists() and report.stat().st_mtime >= started_at:
                _print_gates(json.loads(report.read_text()))
        _fail(str(exc), code=1)
    _print_outputs(name, outputs, time.perf_counter() - started)
    _print_headlines(outputs)


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
    pipe_name, _ = spec.pipeline(pipeline)
    configure_environment(spec, _root(file))
    started = time.perf_counter()
    try:
        with console.status(f"stage {name} ({pipe_name}) running..."):
            result = execute_stage(spec, _root(file), pipe_name, name)
    except (StageError, ModelError) as exc:
        _fail(str(exc), code=1)
    _print_outputs(pipe_name, {name: {k: str(v) for k, v in result.outputs.items()}},
                   time.perf_counter() - started, metrics=result.metrics)
    if name == "gates":
        _print_gates(json.loads(result.outputs["report"].read_text()))


def _print_headlines(outputs: dict[str, dict[str, str]]) -> None:
    """The numbers a person looks for after a run: evaluation, compression, the registered version."""
    if "evaluate" in outputs:
        folder = Path(next(iter(outputs["evaluate"].values()))).parent
        m = json.loads((folder / "metrics.json").read_text())
        c, b = m["candidate"], m["base"]
        out.print(f"evaluate: exact match {c['exact_match']:.3f} (base model {b['exact_match']:.3f}), "
                  f"JSON valid {c['json_valid_rate']:.3f}, intent {c['intent_accuracy']:.3f}, "
                  f"priority {c['priority_accuracy']:.3f}, article {c['article_accuracy']:.3f}; "
                  f"latency p50 {c['latency_p50_ms']} ms, p95 {c['latency_p95_ms']} ms", highlight=False)
    if "compress" in outputs:
        folder = Path(next(iter(outputs["compress"].values()))).parent
        m = json.loads((folder / "metrics.json").read_text())
        chosen = m["variants"][m["chosen"]]
        r = chosen["vs_reference"]
        out.print(f"compress: chose {m['chosen']}: {chosen['size_mb']} MB ({100 * r['size_ratio']:.0f}% of "
                  f"{m['reference']}), {chosen['tokens_per_s_batch1']} tokens/s at batch 1 ({r['speedup_batch1']}x), "
                  f"exact match {chosen['exact_match']:.3f} ({100 * r['exact_match_change']:+.1f} pts) on "
                  f"{m['validation_examples']} validation chats", highlight=False, soft_wrap=True)
    if "gates" in outputs:
        _print_gates(json.loads(Path(outputs["gates"]["report"]).read_text()))
    if "register" in outputs:
        reg = json.loads(Path(outputs["register"]["registration"]).read_text())
        gates = f", gates {reg['gates_status']}" if "gates_status" in reg else ""
        out.print(f"register: {reg['model_name']} version {reg['version']} -> @{reg['alias']}{gates} "
                  f"(MLflow {reg['tracking_uri']})", highlight=False, soft_wrap=True)
    if "promote" in outputs:
        done = json.loads(Path(outputs["promote"]["promotion"]).read_text())
        moves = "; ".join(f"@{m['alias']} {m['from'] or '-'} -> {m['to'] or '-'}" for m in done["moves"])
        out.print(f"promote: version {done['version']} {done['outcome']}" + (f" ({moves})" if moves else "")
                  + (f"; failed gates: {', '.join(done['failed_gates'])} (mode warn)" if done["failed_gates"] else ""),
                  highlight=False)


def _print_gates(report: dict) -> None:
    """The gate report as a table: observed, threshold, margin and result per gate."""
    from components.gates import rows_for_display

    table = Table("gate", "kind", "metric", "observed", "threshold", "margin", "result", "note",
                  title=f"gates: {report['status']} (compared with {report['champion']})", title_justify="left")
    for row in rows_for_display(report):
        colour = "green" if row["result"] == "pass" else "bold red"
        table.add_row(*(escape(v) for v in list(row.values())[:6]), f"[{colour}]{row['result']}[/]",
                      escape(row["note"][:80]))
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


# ---------------------------------------------------------------- models

@models_app.command("pull")
def models_pull(
    file: SpecFile = Path(DEFAULT_SPEC),
    names: Annotated[Optional[list[str]], typer.Argument(help="Models to pull (default: all in the catalog).")] = None,
) -> None:
    """Provision the catalog's models into the state folder (once; later calls are instant)."""
    from components.models import pull
    from llmops.runner import configure_environment

    spec = _load(file, None, None)
    configure_environment(spec, _root(file))
    wanted = names or list(spec.models)
    unknown = [n for n in wanted if n not in spec.models]
    if unknown:
        _fail(f"not in the spec's models catalog: {', '.join(unknown)} (catalog: {', '.join(spec.models)})")
    for name in wanted:
        try:
            with console.status(f"{name}: provisioning..."):
                status, where = pull(name, spec.models[name], spec.state_dir(_root(file)),
                                     log=lambda m: console.print(m, highlight=False))
        except ModelError as exc:
            _fail(str(exc), code=1)
        out.print(f"{name}: {status}  {where}", highlight=False)


@models_app.command("catalog")
def models_catalog(file: SpecFile = Path(DEFAULT_SPEC)) -> None:
    """List the spec's model catalog and whether each model is provisioned."""
    from components.models import resolve

    spec = _load(file, None, None)
    table = Table("name", "source", "location")
    for name, source in spec.models.items():
        try:
            where = resolve(name, spec.models, spec.state_dir(_root(file)))
        except ModelError as exc:
            where = f"[yellow]{escape(str(exc))}[/]"
        table.add_row(name, source.kind, where)
    out.print(table)


# ---------------------------------------------------------------- registry: versions, promotion, rollback

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Registered model (default: the pipeline's register.model_name).")]
ReasonOpt = Annotated[Optional[str], typer.Option("--reason", help="Why: recorded in the registry's audit log.")]


def _registry(file: Path, pipeline: str | None, model: str | None):
    """(MLflow client, registered model name) for the spec's tracking URI; exits 1 with the
    URI when the registry does not answer."""
    from components import registry
    from llmops.runner import configure_environment

    spec = _load(file, None, pipeline)
    _, pipe = spec.pipeline(pipeline)
    configure_environment(spec, _root(file))
    # a registry server that is down should fail the command in seconds, not minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        return registry.client(), model or pipe.register_.model_name
    except registry.RegistryError as exc:
        _fail(str(exc), code=1)


def _print_moves(moves: list[dict]) -> None:
    for m in moves:
        out.print(f"@{m['alias']}: {m['from'] or '-'} -> {m['to'] or '-'}  by {m['by']} at {m['at']}: {m['why']}",
                  highlight=False)


@models_app.command("list")
def models_list(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None, model: ModelOpt = None) -> None:
    """List the registered model's versions: aliases, headline metrics, gate status, creation time."""
    from components import registry

    client, name = _registry(file, pipeline, model)
    try:
        rows = registry.versions(client, name)
    except registry.RegistryError as exc:
        _fail(str(exc), code=1)
    table = Table("version", "aliases", "exact match", "JSON valid", "perplexity", "gates", "created", "git commit",
                  title=name, title_justify="left")
    for r in rows:
        m = r["metrics"]
        gates = r["gates"] + (f" ({r['gates_failed']})" if r["gates_failed"] else "")
        colour = {"passed": "green", "failed": "red"}.get(r["gates"], "yellow")
        table.add_row(str(r["version"]), ", ".join(r["aliases"]), *(f"{m[k]:.3f}" if k in m else "-" for k in (
            "exact_match", "json_valid_rate", "perplexity")), f"[{colour}]{escape(gates)}[/]", r["created"],
            r["git_commit"][:12])
    out.print(table)


@models_app.command("audit")
def models_audit(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None, model: ModelOpt = None) -> None:
    """Every alias move of the registered model, oldest first: who, what, when, why."""
    from components import registry

    client, name = _registry(file, pipeline, model)
    try:
        registry.aliases(client, name)
        _print_moves(registry.audit_log(client, name))
    except registry.RegistryError as exc:
        _fail(str(exc), code=1)


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="Model version to make champion.")],
    reason: ReasonOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Promote although its gates did not pass (needs --reason).")]
    = False,
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    model: ModelOpt = None,
) -> None:
    """Make VERSION the champion; the current one becomes previous. Needs --reason; refuses a
    version whose gates did not pass unless --force."""
    from components import registry

    if not (reason or "").strip():
        _fail("--force needs --reason: say why a version that did not pass its gates is promoted" if force
              else "--reason is required: say why (it is recorded in the registry's audit log)")
    client, name = _registry(file, pipeline, model)
    try:
        found = registry.version(client, name, version)
        status = found.tags.get(registry.GATE_STATUS_TAG, "not run")
        if status != "passed" and not force:
            failed = found.tags.get(registry.GATE_FAILED_TAG)
            _fail(f"{name} version {version}: gates {status}" + (f" ({failed})" if failed else "")
                  + "; not promoted. Use --force --reason TEXT to promote it anyway.", code=1)
        why = reason if status == "passed" else f"forced (gates {status}): {reason}"
        moves = registry.promote(client, name, version, why, action="force" if force else "promote")
    except registry.RegistryError as exc:
        _fail(str(exc), code=1)
    if not moves:
        out.print(f"{name} version {version} is already champion; nothing changed")
    _print_moves(moves)


@app.command()
def rollback(
    reason: ReasonOpt = None,
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    model: ModelOpt = None,
) -> None:
    """Make the previous champion champion again; the demoted one becomes rolled_back."""
    from components import registry

    if not (reason or "").strip():
        _fail("--reason is required: say why (it is recorded in the registry's audit log)")
    client, name = _registry(file, pipeline, model)
    try:
        moves = registry.rollback(client, name, reason)
    except registry.RegistryError as exc:
        _fail(str(exc), code=1)
    _print_moves(moves)


# ---------------------------------------------------------------- data

@data_app.command("generate")
def data_generate(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the tables into.")] = Path("data/demo"),
    n: Annotated[int, typer.Option("--n", help="Number of tickets.", min=1)] = 2000,
    customers: Annotated[int, typer.Option("--customers", help="Number of customers.", min=1)] = 300,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed, same data.")] = 7,
    shift: Annotated[Optional[str], typer.Option(
        "--shift", help="Shifted traffic for drift tests: new_product, language, long or spam.")] = None,
    shift_fraction: Annotated[float, typer.Option(
        "--shift-fraction", help="Share of tickets that are shifted (with --shift).", min=0.0, max=1.0)] = 1.0,
) -> None:
    """Generate demo tickets (with gold labels), customers, profile history and articles as Parquet."""
    from components import generate

    if shift is not None and shift not in generate.SHIFTS:
        _fail(f"--shift {shift!r}: expected one of {', '.join(generate.SHIFTS)}")
    with console.status(f"generating {n} tickets..."):
        data = generate.generate(n_tickets=n, n_customers=customers, seed=seed, shift=shift,
                                 shift_fraction=shift_fraction)
        paths = data.write(out_dir)
    for name, path in paths.items():
        out.print(f"{name:<18} {len(getattr(data, name)):>6} rows  {path}")


# ---------------------------------------------------------------- features

def _feast(file: Path, pipeline: str | None):
    from llmops.runner import configure_environment, stage_dir

    spec = _load(file, None, pipeline)
    name, pipe = spec.pipeline(pipeline)
    configure_environment(spec, _root(file))
    return spec, name, pipe, (_root(file) / spec.services.feast.repo).resolve(), stage_dir(spec, _root(file), name, "features")


@features_app.command("apply")
def features_apply(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """`feast apply`: register the entities, feature views and feature service of feature_repo/."""
    from components import features

    spec, name, _, repo, _ = _feast(file, pipeline)
    try:
        store = features.open_store(repo, spec.state_dir(_root(file)), name, require_registry=False)
        features.apply(store, repo)
    except StageError as exc:
        _fail(str(exc), code=1)
    out.print(f"applied {repo} -> registry {features.feast_state(spec.state_dir(_root(file)), name) / 'registry.db'}")


@features_app.command("embed")
def features_embed(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """Embed the validated articles (skipping those whose text is unchanged) and publish them."""
    import pandas as pd

    from components import features
    from llmops.runner import stage_dir

    spec, name, pipe, repo, out_dir = _feast(file, pipeline)
    articles_file = stage_dir(spec, _root(file), name, "validate") / "articles.parquet"
    if not articles_file.exists():
        _fail(f"{articles_file} is missing; run `llmops run --until validate` first", code=1)
    state = features.feast_state(spec.state_dir(_root(file)), name)
    tickets = pd.read_parquet(articles_file.with_name("tickets.parquet"), columns=["created_at"])
    target = out_dir / "article_embeddings.parquet"
    with console.status("embedding articles..."):
        embedder = features.Embedder(pipe.features.embedding_model, dict(spec.models), spec.state_dir(_root(file)),
                                     pipe.features.batch_size)
        _, embedded, reused = features.embed_and_publish(pd.read_parquet(articles_file), tickets.created_at,
                                                         embedder, state, target)
    out.print(f"{embedded} article(s) embedded, {reused} unchanged -> {target}")


@features_app.command("materialize")
def features_materialize(file: SpecFile = Path(DEFAULT_SPEC), pipeline: PipelineOpt = None) -> None:
    """Load new feature values into the online store (incremental: since the last run)."""
    from datetime import datetime, timezone

    from components import features

    spec, name, _, repo, _ = _feast(file, pipeline)
    try:
        store = features.open_store(repo, spec.state_dir(_root(file)), name)
        features.materialize(store, None, datetime.now(timezone.utc))
    except StageError as exc:
        _fail(str(exc), code=1)
    out.print("materialized up to now")


# ---------------------------------------------------------------- dvc

@dvc_app.command("generate")
def dvc_generate(file: SpecFile = Path(DEFAULT_SPEC),
                 output: Annotated[Path, typer.Option("--output", "-o")] = Path("dvc.yaml")) -> None:
    """Write dvc.yaml for the default pipeline from the spec and the stage registry."""
    from llmops import dvcfile

    spec = _load(file, None, None)
    output.write_text(dvcfile.render(dvcfile.build(spec, file.name)))
    out.print(f"wrote {output}")


@dvc_app.command("check")
def dvc_check(file: SpecFile = Path(DEFAULT_SPEC),
              dvc_file: Annotated[Path, typer.Option("--dvc-file")] = Path("dvc.yaml")) -> None:
    """Fail (exit 1) when dvc.yaml and pipelines.yaml disagree, listing each difference."""
    from llmops import dvcfile

    spec = _load(file, None, None)
    problems = dvcfile.check(spec, dvc_file, file.name)
    for problem in problems:
        console.print(f"[red]{escape(problem)}[/]", highlight=False)
    if problems:
        _fail("dvc.yaml is out of date; run `llmops dvc generate`", code=1)
    out.print(f"{dvc_file} agrees with {file}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
