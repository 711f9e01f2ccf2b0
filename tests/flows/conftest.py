"""An MLflow tracking server as a team runs it when the embedded store is outgrown: a SQL
backend and artifacts in S3 (a moto server), proxied by the tracking server, so clients
need its URL only, no S3 credentials."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import BIN, free_port

BUCKET, PREFIX = "mlflow-artifacts", "mlflow"
# moto accepts any key; only the tracking server holds one, as only it talks to S3
SERVER_AWS = {"AWS_ACCESS_KEY_ID": "server-key", "AWS_SECRET_ACCESS_KEY": "server-secret",
              "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class MlflowServer:
    url: str  # the tracking URI clients are given
    s3_endpoint: str  # the moto server (only the tracking server and the test's own boto3 use it)
    bucket: str
    prefix: str
    log: Path  # both servers' output

    def s3(self):
        """A boto3 S3 client on the moto server, credentials passed here, never through the environment."""
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1",
                            aws_access_key_id=SERVER_AWS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=SERVER_AWS["AWS_SECRET_ACCESS_KEY"])

    def objects(self) -> list[str]:
        """Every key under the artifact prefix of the bucket."""
        keys, pages = [], self.s3().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


def _start(cmd: list[str], env: dict, log: Path, health: str, timeout: float) -> subprocess.Popen:
    """``cmd`` in a process group of its own (a server's workers go with it), once ``health`` answers 200."""
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(health, timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise AssertionError(f"{cmd[0]} did not answer {health}: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def _group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL what is left after 30 s; fails when a
    process of the group outlives that."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        if not _group(proc.pid):
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while _group(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reaps the leader
            time.sleep(0.2)
    proc.poll()
    assert not _group(proc.pid), f"processes of {proc.args[0]} outlived SIGKILL: {_group(proc.pid)}"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A moto S3 server and an `mlflow server` on 127.0.0.1 (free ports): SQLite backend in a
    temporary folder, artifacts proxied to ``s3://mlflow-artifacts/mlflow``. Both stop at the
    end of the session."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    log = folder / "servers.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    # no MLflow jobs (GenAI evaluation): the server would start seven huey consumer processes
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    s3_port, port = free_port(), free_port()
    s3_endpoint = f"http://127.0.0.1:{s3_port}"
    moto = _start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], env, log,
                  f"{s3_endpoint}/moto-api/", 60)
    server = None
    try:
        found = MlflowServer(f"http://127.0.0.1:{port}", s3_endpoint, BUCKET, PREFIX, log)
        found.s3().create_bucket(Bucket=BUCKET)
        server = _start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
                         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                         "--artifacts-destination", f"s3://{BUCKET}/{PREFIX}"],
                        env | SERVER_AWS | {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}, log, f"{found.url}/health", 180)
        yield found
    finally:
        try:
            if server is not None:
                _stop(server)
        finally:
            _stop(moto)
