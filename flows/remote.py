"""Stages that run on another work pool than the pipeline (``deployments.stage_pools``,
e.g. ``finetune: gpu``): the pipeline flow uploads the stage's inputs to shared storage
(``deployments.shared_storage``, an ``s3://`` prefix: never a local path, the pool's worker
may be another machine), runs the stage's one-stage deployment (``llmops-stage/P-STAGE``)
on that pool as a subflow and waits for it; the stage flow there downloads the inputs,
runs the stage as `llmops run` would (its MLflow run nested under the pipeline's: the
tracking server must be shared too), and uploads its outputs; the pipeline flow downloads
them into ``artifacts/`` and goes on."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from components import s3
from components.base import StageError
from flows.deployments import ENTRYPOINTS, deployment_name
from llmops.runner import execute_stage_isolated, flow_setup, stage_dir
from llmops.spec import Spec
from llmops.stages import STAGES

STAGE_FLOW = ENTRYPOINTS["stage"][0]


def inputs_of(spec: Spec, pipeline: str, stage: str) -> tuple[str, ...]:
    return STAGES[stage].inputs(spec.pipelines[pipeline].stages)


def run_remote(spec: Spec, root: Path, spec_file: str, overrides: list[str], pipeline: str, stage: str,
               parent_run_id: str | None, flow_run_id: str) -> dict:
    """Run ``stage`` on its pool; returns {"outputs": name -> local path, "summary"}."""
    from prefect.deployments import run_deployment

    cfg = spec.pipelines[pipeline].deployments
    pool, endpoint = cfg.stage_pools[stage], spec.services.storage.s3_endpoint_url
    transfer = f"{cfg.shared_storage.rstrip('/')}/{pipeline}/{flow_run_id}"
    logger = get_run_logger()
    for name in inputs_of(spec, pipeline, stage):
        count = s3.upload_tree(stage_dir(spec, root, pipeline, name), f"{transfer}/{name}", endpoint)
        logger.info("stage %s: input %s uploaded to %s/%s (%d files)", stage, name, transfer, name, count)
    target = deployment_name("stage", pipeline, stage)
    logger.info("stage %s: running %s on work pool %s", stage, target, pool)
    run = run_deployment(target, parameters={"spec_file": spec_file, "pipeline": pipeline, "stage": stage,
                                             "transfer": transfer, "overrides": overrides,
                                             "parent_run_id": parent_run_id}, timeout=None)
    if not run.state.is_completed():
        raise StageError(f"stage {stage} on work pool {pool}: flow run {run.name} ({run.id}) ended "
                         f"{run.state.name}: {run.state.message or 'no message'}")
    out = stage_dir(spec, root, pipeline, stage)
    count = s3.download_tree(f"{transfer}/{stage}", out, endpoint)
    done = s3.get_json(f"{transfer}/{stage}.json", endpoint)
    logger.info("stage %s: %d output files downloaded from %s/%s", stage, count, transfer, stage)
    return {"outputs": {k: out / v for k, v in done["outputs"].items()}, "summary": done["summary"],
            "flow_run": str(run.id)}


@flow(name=STAGE_FLOW, flow_run_name="{pipeline}-{stage}")
def stage_flow(spec_file: str = "pipelines.yaml", pipeline: str | None = None, stage: str = "finetune",
               transfer: str = "", overrides: list[str] | None = None, parent_run_id: str | None = None) -> dict:
    """One stage on this worker's pool, its inputs and outputs under ``transfer`` (s3://)."""
    logger = get_run_logger()
    overrides = list(overrides or [])
    spec, name, root = flow_setup(spec_file, overrides, pipeline)
    if not transfer.startswith("s3://"):
        raise StageError(f"stage {stage}: transfer must be an s3:// prefix, not {transfer!r}")
    endpoint = spec.services.storage.s3_endpoint_url
    for upstream in inputs_of(spec, name, stage):
        count = s3.download_tree(f"{transfer}/{upstream}", stage_dir(spec, root, name, upstream), endpoint)
        logger.info("input %s: %d files from %s/%s", upstream, count, transfer, upstream)
    result = execute_stage_isolated(spec_file, overrides, name, stage, parent_run_id=parent_run_id)
    out = stage_dir(spec, root, name, stage)
    count = s3.upload_tree(out, f"{transfer}/{stage}", endpoint)
    outputs = {k: str(Path(v).resolve().relative_to(out.resolve())) for k, v in result.outputs.items()}
    s3.put_json(f"{transfer}/{stage}.json", {"outputs": outputs, "summary": result.summary}, endpoint)
    logger.info("stage %s done: %d output files to %s/%s", stage, count, transfer, stage)
    return {"outputs": outputs, "transfer": f"{transfer}/{stage}"}
