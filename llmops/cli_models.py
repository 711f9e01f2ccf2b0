"""`llmops models ...`, `llmops promote`, `llmops rollback`: the model catalog and the registry."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from components.catalog import ModelError
from llmops.cli_common import (DEFAULT_SPEC, PipelineOpt, SetOpt, SpecFile, _fail, _load, _root, app, console,
                               models_app, out)


# ---------------------------------------------------------------- models

@models_app.command("pull")
def models_pull(
    file: SpecFile = Path(DEFAULT_SPEC),
    names: Annotated[Optional[list[str]], typer.Argument(help="Models to pull (default: all in the catalog).")] = None,
) -> None:
    """Provision the catalog's models into the state folder (once; later calls are instant)."""
    from components.catalog import pull
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
    from components.catalog import resolve

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
    no_deploy: Annotated[bool, typer.Option("--no-deploy", help="Move the registry's aliases only; leave the "
                                                                "endpoint as it is.")] = False,
    overrides: SetOpt = None,
) -> None:
    """Make the previous champion champion again (the demoted one becomes rolled_back), and
    put it live on the local endpoint (the deploy stage, strategy direct). A champion that
    never went live (its deploy was refused) is rolled back to the version that is live."""
    from components import registry

    if not (reason or "").strip():
        _fail("--reason is required: say why (it is recorded in the registry's audit log)")
    client, name = _registry(file, pipeline, model)
    pipe = _load(file, None, pipeline).pipeline(pipeline)[1]
    live = registry.deployed_alias(pipe.deploy.target)
    try:
        deployed = live in registry.aliases(client, name)
        moves = registry.rollback(client, name, reason, live=live)
    except registry.RegistryError as exc:
        _fail(str(exc), code=1)
    _print_moves(moves)
    # the endpoint follows when this pipeline's model has been deployed locally before
    if not no_deploy and deployed and name == pipe.register_.model_name:
        from llmops.cli_release import redeploy

        redeploy(file, pipeline, overrides)
