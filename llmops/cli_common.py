"""What every `llmops` command shares: the Typer apps, the consoles, the common options, and
how a command loads the spec and fails (one line on stderr, an exit code)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from llmops.spec import DEFAULT_SPEC, SpecError, Spec, load_spec  # noqa: F401 - DEFAULT_SPEC for the commands

app = typer.Typer(help="Declarative LLMOps: one spec (pipelines.yaml) from raw data to a monitored endpoint.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Check, show and describe pipelines.yaml.", no_args_is_help=True)
models_app = typer.Typer(help="Registered model versions (list, audit) and the spec's `models` catalog "
                              "(pull, catalog).", no_args_is_help=True)
data_app = typer.Typer(help="Data: generate demo tickets, customers and articles; turn labelled traffic into tables.",
                        no_args_is_help=True)
dvc_app = typer.Typer(help="Keep dvc.yaml in step with pipelines.yaml.", no_args_is_help=True)
features_app = typer.Typer(help="Feast: register definitions, embed articles, load the online store.",
                           no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(dvc_app, name="dvc")
app.add_typer(features_app, name="features")
task_app = typer.Typer(help="The task in pipelines.yaml: the answer's JSON Schema.", no_args_is_help=True)
app.add_typer(task_app, name="task")

def _width(stream) -> int | None:
    """Rich's width: the terminal's; in a log or pipe (no terminal) 160 columns unless COLUMNS
    says otherwise, not rich's 80, which squeezes tables into unreadable cells."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else 160


console = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))
out = Console(soft_wrap=True, width=_width(sys.stdout))

SpecFile = Annotated[Path, typer.Option("--file", "-f", envvar="LLMOPS_SPEC",
                                        help="The spec file.", show_default=True)]
PipelineOpt = Annotated[Optional[str], typer.Option("--pipeline", "-p",
                                                    help="Pipeline to use (default: the spec's default_pipeline).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Registered version: name@alias or name/version (default: serve.model, else "
                          "<register.model_name>@champion).")]
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


def _check_services(prefect: bool) -> None:
    """Fail with one line (exit 1) when MLflow, or Prefect for a flow, does not answer."""
    from llmops.services import ServiceError, check_mlflow, check_prefect

    try:
        check_mlflow(os.environ["MLFLOW_TRACKING_URI"])
        if prefect:
            check_prefect(os.environ.get("PREFECT_API_URL"))
    except ServiceError as exc:
        _fail(str(exc), code=1)
