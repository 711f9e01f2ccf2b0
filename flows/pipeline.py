"""The pipeline as a Prefect flow: each stage of pipelines.yaml is a task, run in order.

What runs: the stages listed under ``pipelines.<name>.stages`` (or a --from/--until
slice of them), each in a fresh child process (as under DVC). Where: on an ephemeral
Prefect server with its SQLite database in the state folder, or on the server named by
``services.prefect.api_url``.
Retries: ``pipelines.<name>.retries.<stage>``. Each stage leaves a Markdown artifact.
The parameters are plain JSON (a spec path and overrides), so the same flow can be
deployed to a Prefect server and started from its UI.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.base import StageError
from components.catalog import ModelError
from llmops.runner import end_pipeline_run, execute_stage_isolated, flow_setup, select_stages, start_pipeline_run
from llmops.spec import SpecError, load_spec

EXPECTED_ERRORS = (StageError, ModelError, SpecError)


class _NoTracebackForInputErrors(logging.Filter):
    """Errors about the input (bad data, bad spec, missing model) are explained by their
    message; Prefect would log them with a traceback that only hides it. Bugs keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED_ERRORS):
            record.exc_info = None
            record.exc_text = None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NoTracebackForInputErrors())


@task(task_run_name="{stage}")
def run_stage(spec_file: str, overrides: list[str], pipeline: str, stage: str,
              mlflow_run_id: str | None = None, remote: bool = False) -> dict:
    """One stage, in a child process: the same function `llmops stage` and dvc.yaml call,
    its MLflow run nested under the pipeline's (``remote``: on its pool of
    deployments.stage_pools, flows/remote.py). Returns its outputs and wall time."""
    logger = get_run_logger()
    logger.info("stage %s: started", stage)
    started = time.perf_counter()
    if remote:
        from flows.remote import run_remote
        from prefect.runtime import flow_run

        spec = load_spec(spec_file, overrides, pipeline)
        done = run_remote(spec, Path(spec_file).resolve().parent, spec_file, overrides, pipeline, stage,
                          mlflow_run_id, str(flow_run.id))
        summary, produced = done["summary"], done["outputs"]
    else:
        result = execute_stage_isolated(spec_file, overrides, pipeline, stage, parent_run_id=mlflow_run_id)
        summary, produced = result.summary, result.outputs
    seconds = round(time.perf_counter() - started, 1)
    outputs = {name: str(path) for name, path in produced.items()}
    listing = "\n".join(f"- `{name}`: `{path}`" for name, path in outputs.items())
    create_markdown_artifact(key=artifact_key(pipeline, stage),
                             markdown=f"{summary}\n\n**Outputs**\n{listing}\n",
                             description=f"{pipeline}: {stage}")
    logger.info("stage %s: done in %.1f s", stage, seconds)
    return {"outputs": outputs, "seconds": seconds}


@flow(name="llmops-pipeline", flow_run_name="{pipeline}")
def pipeline_flow(spec_file: str = "pipelines.yaml", pipeline: str | None = None, start: str | None = None,
                  until: str | None = None, overrides: list[str] | None = None,
                  trigger: dict[str, str] | None = None, from_traffic_hours: float | None = None) -> dict[str, dict]:
    """Run ``pipeline`` (default: the spec's default) from ``start`` to ``until``, as one
    MLflow run with a nested run per stage; returns stage -> {"outputs": name -> path,
    "seconds": wall time}. ``trigger``: what started the run (a drift alert's event id,
    model, window and signals when an automation did), kept as the run's MLflow tags.
    ``from_traffic_hours``: first turn that many hours of feedback-labelled requests into
    data/traffic and ingest it beside the source (what a retrain deployment asks for)."""
    import mlflow
    from prefect.runtime import deployment, flow_run

    overrides = list(overrides or [])
    spec, name, root = flow_setup(spec_file, overrides, pipeline)
    traffic = None
    if from_traffic_hours:
        traffic = labelled_traffic(spec_file, name, overrides, from_traffic_hours)
        if traffic["folder"]:
            overrides.append(f"ingest.extra=[{traffic['folder']}]")
            spec = load_spec(spec_file, overrides, name)  # the run's recorded spec says so too
    pipe = spec.pipelines[name]
    stages = select_stages(pipe.stages, start, until)
    run_id = start_pipeline_run(spec, root, name, source="prefect")
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "prefect.flow_run_id", str(flow_run.id))
    if deployment.id:  # None when run outside a deployment (llmops run)
        client.set_tag(run_id, "prefect.deployment", f"{deployment.name} ({deployment.id})")
    client.set_tag(run_id, "llmops.stages", ",".join(stages))
    if traffic is not None:
        client.set_tag(run_id, "llmops.from_traffic", traffic["said"][:5000])
    for key, value in (trigger or {}).items():
        client.set_tag(run_id, f"llmops.trigger.{key}", str(value)[:5000])
    if trigger:
        get_run_logger().info("started by %s %s (%s): %s", trigger.get("event"), trigger.get("event_id"),
                              trigger.get("model"), trigger.get("signals"))
    get_run_logger().info("MLflow run %s (experiment %r, %s)", run_id, name, mlflow.get_tracking_uri())
    outputs: dict[str, dict] = {}
    ok = False
    try:
        for stage in stages:
            shell = run_stage.with_options(retries=pipe.retries.get(stage, 0),
                                           retry_delay_seconds=pipe.retry_delay_s)
            started = time.perf_counter()
            try:
                outputs[stage] = shell(str(spec_file), overrides, name, stage, run_id,
                                       stage in pipe.deployments.stage_pools)
            except Exception as exc:
                # What ran, and how long, for the command's time table on a failed run too.
                exc.stage_results = {**outputs, f"{stage} (failed)": {
                    "outputs": {}, "seconds": round(time.perf_counter() - started, 1)}}
                raise
        ok = True
    finally:
        end_pipeline_run(run_id, ok)
    return outputs


def labelled_traffic(spec_file: str, pipeline: str, overrides: list[str], hours: float) -> dict:
    """`llmops data from-traffic --hours H` (the command a person runs): {"folder":
    "data/traffic" when it wrote the table, else None, "said": its last line}. No feedback
    in the window is normal: the run then trains on its source alone."""
    import subprocess
    import sys

    logger = get_run_logger()
    cmd = [sys.executable, "-m", "llmops", "data", "from-traffic", "-f", spec_file, "-p", pipeline,
           "--hours", f"{hours:g}", *[x for o in overrides for x in ("--set", o)]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=Path(spec_file).resolve().parent)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    said = lines[-1].removeprefix("error: ") if lines else f"exit {done.returncode}"
    if done.returncode != 0:
        logger.warning("no feedback-labelled traffic from the last %g h: %s; training on the source alone", hours, said)
        return {"folder": None, "said": f"skipped: {said}"}
    logger.info("feedback-labelled traffic of the last %g h:\n%s", hours, "\n".join(lines))
    return {"folder": "data/traffic", "said": said}


def artifact_key(pipeline: str, stage: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{pipeline}-{stage}".lower()).strip("-")
