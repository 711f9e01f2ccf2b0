"""`llmops deploy status`: what is live where, since when, and the last deploy attempts; and
the redeploy `llmops rollback` runs (the deploy stage, strategy direct)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from llmops.cli_common import DEFAULT_SPEC, PipelineOpt, SpecFile, _fail, _load, _root, app, console, out

deploy_app = typer.Typer(help="What the deploy stage put live: `llmops deploy status`. (Deploying is the "
                              "pipeline's deploy stage: `llmops stage deploy`.)", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("status")
def deploy_status(
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    last: Annotated[int, typer.Option(help="How many recent attempts to list.")] = 5,
) -> None:
    """The version live on each target (the registry's deployed-<target> aliases, since when),
    the local endpoint as it answers now (live version, since, candidate, last events), and
    the last deploy attempts with their outcome and reason."""
    from components import registry
    from components.deploy import attempts_path
    from components.deploy.local import Endpoint, EndpointError, endpoint_url, record_path
    from llmops.runner import configure_environment

    spec = _load(file, None, pipeline)
    name, pipe = spec.pipeline(pipeline)
    root = _root(file)
    configure_environment(spec, root)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    model = pipe.register_.model_name
    try:
        client = registry.client()
        current = registry.aliases(client, model)
        log = registry.audit_log(client, model)
    except registry.RegistryError as exc:
        _fail(str(exc), code=1)
    out.print(f"{model} (pipeline {name}): champion {current.get(registry.CHAMPION, '-')}", highlight=False)
    for target in ("local", "kserve", "sagemaker"):
        alias = registry.deployed_alias(target)
        moved = next((e for e in reversed(log) if e["alias"] == alias and e["from"] != e["to"]), None)
        if alias in current:
            out.print(f"  {target}: version {current[alias]} live since {moved['at'] if moved else '?'} "
                      f"(by {moved['by'] if moved else '?'})", highlight=False)
    champion, live_local = current.get(registry.CHAMPION), current.get(registry.deployed_alias("local"))
    if champion is not None and pipe.deploy.target == "local" and champion != live_local:
        out.print(f"  champion {champion} is not live on local (see the last attempts below; `llmops stage deploy` "
                  "deploys it)", highlight=False)
    from components import background

    serve = pipe.serve
    started = background.read_record(record_path(spec.state_dir(root), name))
    url = started["url"] if started else endpoint_url(pipe.deploy.local, serve)
    try:
        status = Endpoint(url, os.environ.get(serve.admin_key_env) or None).status()
    except EndpointError as exc:
        status = None
        out.print(f"  endpoint {url}: {exc}", highlight=False)
    if status is None:
        out.print(f"  endpoint {url}: not answering", highlight=False)
    else:
        live = status["live"]
        out.print(f"  endpoint {url}: serving {live['model']} ({live['variant']}) since {live['since']}, "
                  f"{'ready' if live['ready'] else 'NOT ready: ' + str(live['reason'])}"
                  + (f"; started by deploy, pid {started['pid']}" if started else ""), highlight=False)
        if status["candidate"]:
            cand = status["candidate"]
            out.print(f"    candidate {cand['model']} loaded since {cand['since']}, routing: {status['mode']}",
                      highlight=False)
        for event in status["events"][-5:]:
            out.print(f"    {event['at']}  {event['event']:<9} {event['model']}"
                      + (f"  {event['detail']}" if event.get("detail") else ""), highlight=False)
    path = attempts_path(spec.state_dir(root), name)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    out.print(f"last deploy attempts ({min(last, len(rows))} of {len(rows)}; {path}):", highlight=False)
    for row in rows[-last:]:
        out.print(f"  {row['at']}  version {row['version']} -> {row['target']} ({row['strategy']}): {row['outcome']}"
                  + (f": {row['reason']}" if row.get("reason") else ""), highlight=False)


def redeploy(file: Path, pipeline: str | None, overrides: list[str] | None = None) -> None:
    """After a rollback: the deploy stage (strategy direct) puts the restored champion live on
    the local endpoint, when one answers there or the pipeline has deployed before."""
    from components.base import StageError
    from components.catalog import ModelError
    from llmops.runner import configure_environment, execute_stage

    overrides = [*(overrides or []), "deploy.strategy=direct"]
    spec = _load(file, overrides, pipeline)
    name, pipe = spec.pipeline(pipeline)
    if "deploy" not in pipe.stages or pipe.deploy.target != "local":
        return
    root = _root(file)
    configure_environment(spec, root)
    try:
        with console.status("deploying the restored champion ..."):
            result = execute_stage(spec, root, name, "deploy", spec_file=file, overrides=overrides)
    except (StageError, ModelError) as exc:
        _fail(f"the registry rolled back, but the endpoint did not: {exc}", code=1)
    report = result.report
    out.print(f"deploy: version {report.version} {report.outcome} at {report.url}", highlight=False)
