"""The pipeline as a Prefect flow: each stage of pipelines.yaml is a task, run in order.

What runs: the stages listed under ``pipelines.<name>.stages`` (or a --from/--until
slice of them). Where: in-process, on an ephemeral Prefect server with its SQLite
database in the state folder, or on the server named by ``services.prefect.api_url``.
Retries: ``pipelines.<name>.retries.<stage>``. Each stage leaves a Markdown artifact.
"""
from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from llmops.runner import execute_stage
from llmops.spec import Spec


@task(task_run_name="{stage}")
def run_stage(spec: Spec, root: str, pipeline: str, stage: str) -> dict[str, str]:
    """One stage: the same function `llmops stage` and dvc.yaml call."""
    logger = get_run_logger()
    logger.info("stage %s: started", stage)
    result = execute_stage(spec, Path(root), pipeline, stage)
    outputs = {name: str(path) for name, path in result.outputs.items()}
    listing = "\n".join(f"- `{name}`: `{path}`" for name, path in outputs.items())
    create_markdown_artifact(key=_artifact_key(pipeline, stage),
                             markdown=f"{result.summary}\n\n**Outputs**\n{listing}\n",
                             description=f"{pipeline}: {stage}")
    logger.info("stage %s: done, metrics %s", stage, result.metrics)
    return outputs


@flow(name="llmops-pipeline", flow_run_name="{pipeline}", log_prints=True)
def pipeline_flow(spec: Spec, root: str, pipeline: str, stages: list[str]) -> dict[str, dict[str, str]]:
    """Run ``stages`` of ``pipeline`` in order; returns stage -> output name -> path."""
    pipe = spec.pipelines[pipeline]
    outputs: dict[str, dict[str, str]] = {}
    for stage in stages:
        shell = run_stage.with_options(retries=pipe.retries.get(stage, 0),
                                       retry_delay_seconds=pipe.retry_delay_s)
        outputs[stage] = shell(spec, root, pipeline, stage)
    return outputs


def _artifact_key(pipeline: str, stage: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{pipeline}-{stage}".lower()).strip("-")
