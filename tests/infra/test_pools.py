"""The GPU pools' base job templates against a real Prefect server, and the compose file's
MLflow settings against a real MLflow server: what the servers accept and do with them, not
only what the files say."""
from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
from pathlib import Path

import httpx
import jsonschema
import pytest
from pydantic import ConfigDict

from tests.conftest import BIN, REPO, cli_env, free_port, wait_healthy
from tests.infra.test_manifests import compose, k8s_schema, template

POOL_TYPES = {"kubernetes-gpu": "kubernetes", "docker-gpu": "docker"}


def render(api_url: str, base_job_template: dict, values: dict) -> dict:
    """The job configuration a worker of the pool builds for a flow run with these job
    variables: Prefect's own templating, block references resolved by the server."""
    from prefect.client.orchestration import PrefectClient
    from prefect.workers.base import BaseJobConfiguration

    class Configuration(BaseJobConfiguration):  # keeps the worker-specific keys (job_manifest, ...)
        model_config = ConfigDict(extra="allow")

    async def build():
        async with PrefectClient(api=api_url) as client:
            config = await Configuration.from_template_and_values(base_job_template, values, client=client)
        return config.model_dump()

    return asyncio.run(build())


@pytest.mark.parametrize("name", list(POOL_TYPES))
def test_prefect_server_accepts_each_gpu_pool_and_gives_it_back(prefect_server, name):
    body = {"name": f"{name}-api", "type": POOL_TYPES[name], "base_job_template": template(name),
            "concurrency_limit": 2}
    created = httpx.post(f"{prefect_server}/work_pools/", json=body, timeout=30)
    assert created.status_code == 201, created.text
    pool = httpx.get(f"{prefect_server}/work_pools/{name}-api", timeout=30).json()
    assert pool["type"] == POOL_TYPES[name] and pool["concurrency_limit"] == 2
    assert pool["base_job_template"] == template(name)
    # a template that uses a variable it does not declare is refused, naming it
    broken = copy.deepcopy(template(name))
    broken["variables"]["properties"].pop("gpu_count")
    refused = httpx.post(f"{prefect_server}/work_pools/", timeout=30,
                         json={**body, "name": f"{name}-broken", "base_job_template": broken})
    assert refused.status_code == 422 and "gpu_count" in refused.text


def test_a_deployment_changes_the_gpu_count_of_the_kubernetes_pool(prefect_server):
    pool = httpx.get(f"{prefect_server}/work_pools/kubernetes-gpu-api", timeout=30)
    if pool.status_code == 404:
        httpx.post(f"{prefect_server}/work_pools/", timeout=30, json={
            "name": "kubernetes-gpu-api", "type": "kubernetes", "base_job_template": template("kubernetes-gpu")})
        pool = httpx.get(f"{prefect_server}/work_pools/kubernetes-gpu-api", timeout=30)
    base = pool.json()["base_job_template"]
    job = render(prefect_server, base, {"gpu_count": 2, "memory_limit": "64Gi"})["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": 2}
    assert job["metadata"]["namespace"] == "llmops" and job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert [e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"]] == \
        ["LLMOPS_S3_ACCESS_KEY", "LLMOPS_S3_SECRET_KEY"]
    job["metadata"]["generateName"] = "support-triage-"  # the worker fills name, labels and args in
    jsonschema.validate(job, k8s_schema("Job"))
    # what Prefect does with a variable the template does not declare: nothing
    default = render(prefect_server, base, {"gpus": 4})["job_manifest"]
    assert default["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_docker_pool_requests_gpus_and_reads_its_key_from_secret_blocks(prefect_server):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import PrefectClient

    async def save_secrets():
        async with PrefectClient(api=prefect_server) as client:
            await Secret(value="llmops").asave("llmops-s3-access-key", overwrite=True, client=client)
            await Secret(value="s3-secret-from-block").asave("llmops-s3-secret-key", overwrite=True, client=client)

    asyncio.run(save_secrets())
    config = render(prefect_server, template("docker-gpu"), {"gpu_count": 3, "image": "registry.example/llmops:cu"})
    assert config["container_create_kwargs"]["device_requests"] == [
        {"driver": "nvidia", "count": 3, "capabilities": [["gpu"]]}]
    assert config["container_create_kwargs"]["shm_size"] == "8g"
    # what docker-py (the Docker worker's client) sends to the Docker API for these kwargs
    from docker.models.containers import _create_container_args

    host = _create_container_args({"image": config["image"], "version": "1.45", **config["container_create_kwargs"]})
    assert host["host_config"]["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": 3, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}]
    assert host["host_config"]["ShmSize"] == 8 * 1024 ** 3
    assert config["env"]["AWS_SECRET_ACCESS_KEY"] == "s3-secret-from-block"
    assert config["env"]["MLFLOW_TRACKING_URI"] == compose()["x-llmops-env"]["MLFLOW_TRACKING_URI"]
    assert (config["image"], config["networks"], config["volumes"]) == \
        ("registry.example/llmops:cu", ["llmops"], ["llmops-state:/var/lib/llmops"])


def test_the_documented_commands_create_the_gpu_pool_with_one_run_per_gpu(prefect_server):
    """infra/README.md: `prefect work-pool create ... --base-job-template`, then the limit."""
    env = cli_env(PREFECT_API_URL=prefect_server)

    def prefect(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)

    create = prefect("work-pool", "create", "gpu", "--type", "kubernetes",
                     "--base-job-template", "infra/pools/kubernetes-gpu.json")
    assert create.returncode == 0, create.stdout + create.stderr
    limit = prefect("work-pool", "set-concurrency-limit", "gpu", "4")
    assert limit.returncode == 0 and "Set concurrency limit for work pool 'gpu' to 4" in limit.stdout
    pool = httpx.get(f"{prefect_server}/work_pools/gpu", timeout=30).json()
    assert pool["concurrency_limit"] == 4 and pool["base_job_template"] == template("kubernetes-gpu")
    readme = (REPO / "infra" / "README.md").read_text()
    assert "prefect work-pool create gpu --type kubernetes --base-job-template infra/pools/kubernetes-gpu.json" in readme
    assert "prefect work-pool set-concurrency-limit gpu" in readme


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` as infra/compose.yaml runs it (its command and environment), with
    SQLite in place of Postgres and moto's S3 in place of MinIO."""
    from moto.server import ThreadedMotoServer

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3.start()
    host, s3_port = s3.get_host_and_port()
    service = compose()["services"]["mlflow"]
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [str(BIN / "mlflow"), *service["command"][1:]]
    command[command.index("--port") + 1] = str(port)
    command[command.index("--host") + 1] = "127.0.0.1"
    settings = {k: v for k, v in service["environment"].items() if "${" not in v}  # not the secrets
    assert set(settings) == {"MLFLOW_S3_ENDPOINT_URL", "MLFLOW_SERVER_ALLOWED_HOSTS", "MLFLOW_DISABLE_TELEMETRY"}
    settings |= {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{folder / 'mlflow.db'}",
                 "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{s3_port}", "AWS_ACCESS_KEY_ID": "test",
                 "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    env = cli_env(**settings)
    import boto3

    boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").create_bucket(Bucket="mlflow")
    with (folder / "server.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    wait_healthy(f"http://127.0.0.1:{port}/health", proc, folder / "server.log", 300,  # 60-80 s on a busy machine
                 "mlflow server")
    yield {"url": f"http://127.0.0.1:{port}", "s3": env["MLFLOW_S3_ENDPOINT_URL"]}
    os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    s3.stop()


def test_mlflow_server_answers_the_name_other_containers_use_and_stores_artifacts_in_s3(mlflow_server):
    api = f"{mlflow_server['url']}/api/2.0/mlflow"
    as_in_compose = {"Host": "mlflow:5000"}  # MLFLOW_TRACKING_URI=http://mlflow:5000
    assert httpx.get(f"{api}/experiments/search", params={"max_results": 1}, headers={"Host": "elsewhere:5000"},
                     timeout=30).status_code == 403
    created = httpx.post(f"{api}/experiments/create", json={"name": "compose"}, headers=as_in_compose, timeout=30)
    assert created.status_code == 200, created.text
    experiment = httpx.get(f"{api}/experiments/get", params={"experiment_id": created.json()["experiment_id"]},
                           headers=as_in_compose, timeout=30).json()["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # proxied: clients need no S3 key
    run = httpx.post(f"{api}/runs/create", json={"experiment_id": experiment["experiment_id"]},
                     headers=as_in_compose, timeout=30).json()["run"]["info"]
    relative = run["artifact_uri"].split("mlflow-artifacts:/", 1)[1].lstrip("/")
    put = httpx.put(f"{mlflow_server['url']}/api/2.0/mlflow-artifacts/artifacts/{relative}/card.md",
                    content=b"# model card", headers=as_in_compose, timeout=30)
    assert put.status_code == 200, put.text
    import boto3

    s3 = boto3.client("s3", endpoint_url=mlflow_server["s3"], region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]]
    assert keys == [f"artifacts/{relative}/card.md"]
    assert s3.get_object(Bucket="mlflow", Key=keys[0])["Body"].read() == b"# model card"
    assert Path(relative).parts[0] == experiment["experiment_id"]
