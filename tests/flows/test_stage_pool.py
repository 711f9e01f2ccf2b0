"""A stage on another work pool (the GPU path, with a process pool ``gpu-stand-in`` standing in
for the GPU machine's worker; ~2 min): `llmops run` on a real Prefect server runs ingest
itself and validate as a run of the one-stage deployment on that pool, through a real
worker of that pool; inputs and outputs travel through S3 (moto's server), the outputs land
in artifacts/, and the stage's MLflow run is nested under the pipeline's."""
from __future__ import annotations

import json
import os

import httpx
import pytest

from tests.conftest import REPO, clear_deployments, make_project, prefect_worker, run_cli, sqlite_registry

PIPELINE = "support-triage"
POOL = "gpu-stand-in"  # a process pool in place of a GPU machine's (the server serves the whole session)


@pytest.mark.integration
def test_validate_runs_on_the_gpu_pool_with_its_files_through_s3(prefect_server, s3_endpoint, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="llmops")
    project = make_project(tmp_path / "project", {"ingest.source.n_tickets": 300})
    pools = {"cpu": {"type": "process"}, POOL: {"type": "process", "concurrency": 1}}
    sets = ["--set", f"deployments.pools={json.dumps(pools)}", "--set", f"deployments.stage_pools={{validate: {POOL}}}",
            "--set", "deployments.shared_storage=s3://llmops/transfer", "--set", f"deployments.source={REPO}"]
    env = {"PREFECT_API_URL": prefect_server, "AWS_ENDPOINT_URL": s3_endpoint, "COLUMNS": "250",
           **{k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}
    applied = run_cli(["deployments", "apply", *sets], cwd=project, **env)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert f"work pool {POOL} (process) created, 1 run(s) at once" in applied.stdout
    assert "llmops-stage/support-triage-validate" in applied.stdout

    try:
        with prefect_worker(prefect_server, POOL, tmp_path / "worker.log", **env):
            ran = run_cli(["run", "--until", "validate", *sets], cwd=project, **env)
        runs = httpx.post(f"{prefect_server}/flow_runs/filter", json={"work_pools": {"name": {"any_": [POOL]}}}).json()
    finally:
        clear_deployments(prefect_server)  # leave the session's server as found
        httpx.delete(f"{prefect_server}/work_pools/{POOL}")
    assert ran.returncode == 0, ran.stdout + ran.stderr + (tmp_path / "worker.log").read_text()[-3000:]
    assert f"running llmops-stage/support-triage-validate on work pool {POOL}" in ran.stderr

    validate = project / "artifacts" / PIPELINE / "validate"
    report = json.loads((validate / "validation.json").read_text())
    assert report["success"] is True and report["rows_in"] == 300
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket="llmops", Prefix="transfer/")["Contents"]]
    [run_id] = {k.split("/")[2] for k in keys}
    assert f"transfer/{PIPELINE}/{run_id}/ingest/tickets.parquet" in keys  # the input, sent
    assert f"transfer/{PIPELINE}/{run_id}/validate/validation.json" in keys  # the output, returned
    assert f"transfer/{PIPELINE}/{run_id}/validate.json" in keys

    stage_runs = [r for r in runs if r["parameters"].get("transfer", "").endswith(run_id)]
    assert [r["state"]["type"] for r in stage_runs] == ["COMPLETED"] and stage_runs[0]["parent_task_run_id"]

    with sqlite_registry(project / ".llmops" / "mlflow", experiment=PIPELINE):
        import mlflow

        found = mlflow.search_runs(experiment_names=[PIPELINE], output_format="list")
        [parent] = [r for r in found if r.data.tags.get("llmops.stages") == "ingest,validate"]
        [stage] = [r for r in found if r.data.tags.get("llmops.stage") == "validate"]
        assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id and stage.info.status == "FINISHED"
