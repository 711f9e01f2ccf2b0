"""`llmops up` / `llmops down` on a fresh project (~1-2 min): the Prefect server with the
deployments applied, a worker and the MLflow UI come up on 127.0.0.1 and answer; a second
`up` starts nothing; without a champion the endpoint is not started and says why; `down`
leaves no process behind; a taken port is refused by number."""
from __future__ import annotations

import json
import socket

import httpx
import pytest

from components.background import alive
from tests.conftest import REPO, free_port, make_project, run_cli


@pytest.mark.integration
def test_up_twice_then_down(tmp_path):
    project = make_project(tmp_path / "project")
    prefect, mlflow = free_port(), free_port()
    # the code is this repository's (the project copy holds the spec and data only)
    args = ["up", "--prefect-port", str(prefect), "--mlflow-port", str(mlflow), "--set", f"deployments.source={REPO}"]
    first = run_cli(args, cwd=project, COLUMNS="250")
    records = {p.stem: json.loads(p.read_text()) for p in (project / ".llmops" / "stack").glob("*.json")}
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        assert set(records) == {"prefect-server", "worker-cpu", "mlflow-ui"}, records
        rows = {line.split("│")[1].strip(): line for line in first.stdout.splitlines() if line.count("│") > 3}
        assert all("started" in rows[name] for name in records), first.stdout
        assert "not started" in rows["endpoint"] and "endpoint: no registered model 'support-triage'" in first.stdout
        api = f"http://127.0.0.1:{prefect}/api"
        assert httpx.get(f"{api}/health").json() is True
        assert httpx.get(f"http://127.0.0.1:{mlflow}/health").status_code == 200
        names = sorted(d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}).json())
        assert names == [f"support-triage-{k}" for k in ("materialize", "monitor", "retrain", "retrain-notice")]
        workers = httpx.post(f"{api}/work_pools/cpu/workers/filter", json={}).json()
        assert [w["status"] for w in workers] == ["ONLINE"]

        second = run_cli(args, cwd=project, COLUMNS="250")
        assert second.returncode == 0, second.stdout + second.stderr
        assert second.stdout.count("already running") == 3 and "starting" not in second.stderr
        listed = run_cli(["deployments", "list"], cwd=project, COLUMNS="250")  # finds the stack's server itself
        assert listed.returncode == 0 and f"deployments on {api}" in listed.stdout, listed.stdout + listed.stderr

        with socket.socket() as other:  # another process on the Prefect port of a second project
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            taken = run_cli(["up", "--prefect-port", str(port), "--no-serve"], cwd=make_project(tmp_path / "other"))
        assert taken.returncode == 1 and f"port {port} on 127.0.0.1 is taken" in taken.stderr, taken.stderr
    finally:
        down = run_cli(["down"], cwd=project)
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(f"stopped {name}" in down.stdout for name in records), down.stdout
    assert not any(alive(r["pid"]) for r in records.values())
    assert "nothing was running" in run_cli(["down"], cwd=project).stdout
