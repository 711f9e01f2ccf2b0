"""The project's own commands against an MLflow tracking server with a SQL backend and its
artifacts in S3, as docs/operations.md tells a team to scale out: on a copy of the shared
pipeline run, `llmops run --from register` registers and promotes on the server, the
version's files land in the bucket, and `llmops models list`, `llmops serve` and
`llmops monitor` work from the tracking URI alone. No client process holds S3 credentials:
the server proxies every artifact.

Duration: about 4 minutes on 2 busy cores (the two servers up in 0.5-1 min, register and
promote under Prefect 2-2.5 min, serve with the feature server it starts 1 min, monitor
1 min), after the shared pipeline run (tests/conftest.py ``pipeline_run``: 7-10 more
minutes when no earlier test needed it; this module alone from cold took 9.6 min).
"""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time

import httpx
import mlflow
import pandas as pd
import pytest

from components.splits import read_examples
from serving.model import SOURCE
from tests.conftest import BIN, ENFORCE, ENV, cli_env, copy_project, free_port
from tests.serving.conftest import serve_cli

pytestmark = pytest.mark.integration

NAME = "support-triage"
ANSWER = {"intent", "priority", "article_id"}


def client_env(server) -> dict[str, str]:
    """A client's environment: the tracking URI, and no AWS credentials or S3 endpoint of any
    kind (nor a credentials file or instance metadata to find them in)."""
    env = {k: v for k, v in cli_env(**ENV).items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    return env | {"MLFLOW_TRACKING_URI": server.url, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/credentials",
                  "AWS_CONFIG_FILE": "/nonexistent/config", "AWS_EC2_METADATA_DISABLED": "true"}


def llmops(args: list[str], project, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "llmops"), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def on_server(pipeline_run, mlflow_server, tmp_path_factory):
    """A copy of the shared run whose registry stages ran again with the server as tracking
    URI: (project, client environment, the run's process)."""
    assert pipeline_run.returncode == 0, pipeline_run.stdout + pipeline_run.stderr
    project = copy_project(pipeline_run, tmp_path_factory.mktemp("on-server") / "project")
    env = client_env(mlflow_server)
    return project, env, llmops(["run", "--from", "register", *ENFORCE], project, env)


def test_the_client_has_no_s3_credentials(on_server):
    env = on_server[1]
    found = subprocess.run([sys.executable, "-c", "import boto3; print(boto3.Session().get_credentials())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert found.stdout.strip() == "None", found.stdout + found.stderr
    assert not [k for k in env if k.startswith(("AWS_ACCESS", "AWS_SECRET", "AWS_SESSION", "MLFLOW_S3"))]


def test_register_and_promote_on_the_server_with_the_files_in_s3(on_server, mlflow_server):
    project, _, proc = on_server
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"register: {NAME} version 1 -> @challenger, gates passed (MLflow {mlflow_server.url})" in proc.stdout
    assert "promote: version 1 promoted" in proc.stdout
    assert "View run" not in proc.stdout  # MLflow's links stay out of the command's report
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    assert client.get_registered_model(NAME).aliases == {"champion": "1"}
    version = client.get_model_version(NAME, "1")
    assert (version.tags["gates.status"], version.tags["promotion"]) == ("passed", "promoted")
    run = client.get_run(version.run_id)
    assert version.source == f"{run.info.artifact_uri}/model" and version.source.startswith("mlflow-artifacts:/")

    # the bucket holds the version's files, each with the SHA-256 its manifest records
    s3, prefix = mlflow_server.s3(), f"{mlflow_server.prefix}/{run.info.experiment_id}/{run.info.run_id}/artifacts/"

    def read(key: str) -> bytes:
        return s3.get_object(Bucket=mlflow_server.bucket, Key=prefix + key)["Body"].read()

    keys = {k.removeprefix(prefix) for k in mlflow_server.objects() if k.startswith(prefix)}
    manifest = json.loads(read("model/llmops-model.json"))
    serving = manifest["serving"]
    assert serving["variant"] == version.tags["serving_variant"]
    assert {"model/adapter/adapter_model.safetensors", "model/README.md", "model/gates.json",
            *(f"model/serving/{name}" for name in serving["files_sha256"]),
            *(f"data/{split}.jsonl" for split in manifest["data_sha256"])} <= keys
    assert hashlib.sha256(read("model/adapter/adapter_model.safetensors")).hexdigest() == manifest["adapter_sha256"]
    assert {name: hashlib.sha256(read(f"model/serving/{name}")).hexdigest()
            for name in serving["files_sha256"]} == serving["files_sha256"]
    assert any(name.endswith((".onnx", ".onnx_data", ".safetensors")) for name in serving["files_sha256"])
    assert {split: hashlib.sha256(read(f"data/{split}.jsonl")).hexdigest()
            for split in manifest["data_sha256"]} == manifest["data_sha256"]

    # nothing was registered in the project's own store: it still holds the shared run's version only
    local = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / '.llmops' / 'mlflow' / 'mlflow.db'}")
    assert [str(v.version) for v in local.search_model_versions(f"name='{NAME}'")] == ["1"]


def test_models_list_reads_the_server(on_server, mlflow_server):
    project, env, _ = on_server
    listed = llmops(["models", "list"], project, env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    header = next(line for line in listed.stdout.splitlines() if "version" in line)
    assert [cell.strip() for cell in header.split("┃")[1:3]] == ["version", "aliases"]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in listed.stdout.splitlines()
            if line.count("│") > 5]
    assert [(r[0], r[1], r[5]) for r in rows] == [("1", "champion", "passed")], listed.stdout


def readiness(url: str, timeout: float = 300.0) -> httpx.Response:
    """/ready once the golden prompt has been answered (its verdict), or its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/ready", timeout=30)
        if "not been answered yet" not in r.text or time.monotonic() > deadline:
            return r
        time.sleep(1)


@pytest.fixture(scope="module")
def served(on_server):
    """`llmops serve` of the server's champion, one test ticket through /v1/triage, then
    SIGTERM: its answers and output."""
    project, env, proc = on_server
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = project / "artifacts" / NAME
    example = read_examples(out / "prepare" / "test.jsonl")[0]
    row = pd.read_parquet(out / "ingest" / "tickets.parquet").set_index("ticket_id").loc[example["ticket_id"]]
    ticket = {"ticket_id": example["ticket_id"], "subject": row.subject, "body": row.body, "channel": row.channel,
              "customer_id": row.customer_id}
    port = free_port()
    server = serve_cli(["serve", "--port", str(port)], project, port, timeout=600, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = readiness(url)
        triage = httpx.post(f"{url}/v1/triage", json=ticket, timeout=300)
        models = httpx.get(f"{url}/v1/models", timeout=30)
    finally:
        server.send_signal(signal.SIGTERM)  # as an orchestrator stops it
        _, err = server.communicate(timeout=180)
    return {"ready": ready, "triage": triage, "models": models, "stderr": err, "project": project}


def test_serve_loads_the_champion_through_the_server_and_answers(served, mlflow_server):
    version = mlflow.MlflowClient(tracking_uri=mlflow_server.url).get_model_version(NAME, "1")
    variant, err = version.tags["serving_variant"], served["stderr"]
    ready = served["ready"].json()
    assert (ready["model"], ready["variant"]) == (f"{NAME}/1", variant), ready
    # the downloaded weights answered the manifest's golden prompt, checked against its schema:
    # ready, or not ready for exactly that reason (unconstrained, a 2-step model writes no valid
    # JSON; /v1/triage constrains decoding to the schema)
    assert served["ready"].status_code == 200 or ready["reason"].startswith(
        "the golden prompt's answer is not valid"), ready
    assert served["triage"].status_code == 200, served["triage"].text + err
    body = served["triage"].json()
    assert (body["model"], body["variant"], body["valid"]) == (f"{NAME}/1", variant, True), body
    assert set(body["answer"]) == ANSWER and body["articles"] and body["errors"] == []
    assert [m["id"] for m in served["models"].json()["data"]] == [f"{NAME}/1"]
    folder = served["project"] / ".llmops" / "serving" / "versions" / NAME / "1"
    assert f"serving {NAME}/1 ({NAME}@champion, {variant}) loaded in" in err and str(folder) in err
    assert (folder / SOURCE).read_text() == version.source  # downloaded from the server, not another registry
    assert f"stopped serving {NAME}/1; request log: 1 written, 0 dropped" in err, err
    assert "Traceback" not in err


def test_monitor_finds_the_reference_through_the_server(served, on_server, mlflow_server):
    """With prepare's output gone, the training split comes from the register run's
    artifacts (data/train.jsonl), downloaded through the server."""
    project, env, _ = on_server
    train = project / "artifacts" / NAME / "prepare" / "train.jsonl"
    train.rename(train.with_suffix(".moved"))
    proc = llmops(["monitor"], project, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    version = client.get_model_version(NAME, "1")
    [path] = (project / ".llmops" / "monitor" / NAME / "runs").glob("*/summary.json")
    summary = json.loads(path.read_text())
    assert summary["reference"]["found_at"] == "registry run"
    assert summary["reference"]["sha256"] == version.tags["data_sha256.train"]
    assert summary["window"]["requests"] == 1
    assert f"{NAME}/1: 1 requests" in proc.stdout and "train prompts" in proc.stdout
    run = client.get_run(version.tags["monitor.last_run"])
    assert run.data.tags["llmops.model_version"] == f"{NAME}/1"
    key = f"{mlflow_server.prefix}/{run.info.experiment_id}/{run.info.run_id}/artifacts/monitor/summary.json"
    assert key in mlflow_server.objects()
