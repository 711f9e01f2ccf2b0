"""The scheduled deployments on a real Prefect server with a real process worker (~3-4 min):
`llmops deployments apply` registers the pool and deployments (twice: nothing doubles),
`list` shows them with schedules and next runs; the monitor deployment runs through the
worker when started and when its cron fires; a drift event schedules a retrain run after
the review window, with the event in its parameters, the notice reaches the alert
webhook, and the scheduled run can be cancelled as the notice says."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from tests.conftest import BIN, REPO, clear_deployments, cli_env, prefect_worker, run_cli, sqlite_registry
from tests.serving.conftest import DRIFT
from tests.serving.test_monitor_live import SETTINGS

PIPELINE = "support-triage"
MONITOR = f"llmops-monitor/{PIPELINE}-monitor"
RETRAIN = f"llmops-pipeline/{PIPELINE}-retrain"


@pytest.fixture
def worker(prefect_server, webhook, tmp_path):
    """``worker()`` starts a process worker of pool cpu with the alert webhook in its
    environment (the runs it starts send notices there); returns its log file."""
    url, _ = webhook
    with contextlib.ExitStack() as stack:
        def start() -> Path:
            stack.enter_context(prefect_worker(prefect_server, "cpu", tmp_path / "worker.log",
                                               LLMOPS_ALERT_WEBHOOK_URL=f"{url}/notice"))
            return tmp_path / "worker.log"

        yield start


def api(server: str, method: str, path: str, **body):
    for _ in range(5):  # a SQLite server busy with its scheduler answers 503 now and then
        r = httpx.request(method, f"{server}{path}", json=None if method == "GET" else body, timeout=30)
        if r.status_code != 503:
            break
        time.sleep(2)
    assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:500]}"
    return r.json() if r.content else None


def runs_of(server: str, deployment_id: str) -> list[dict]:
    return api(server, "POST", "/flow_runs/filter", flow_runs={"deployment_id": {"any_": [deployment_id]}}, limit=200)


def wait_for(what: str, check, timeout_s: float, log=None):
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s" + (f"\nworker log:\n{log.read_text()[-3000:]}"
                                                                             if log else ""))
        time.sleep(2)


def test_deployments_run_on_a_worker_and_drift_schedules_a_cancellable_retrain(
        drift_traffic, feature_project, prefect_server, webhook, worker, tmp_path):
    _, received = webhook
    project = feature_project["project"]
    # The monitor deployment watches the ordinary traffic of drift-triage every minute; the
    # code is this repository (the project copy holds the spec and data only).
    monitor_overrides = [o for o in SETTINGS if o != "--set"] + [
        f"monitor.log={drift_traffic['ordinary']}", f"serve.model={DRIFT}@champion",
        f"monitor.window.last_requests={drift_traffic['n']}"]
    apply_args = ["deployments", "apply", "--set", f"deployments.source={REPO}",
                  "--set", 'deployments.monitor.cron="* * * * *"',  # quoted: YAML reads a bare * as an alias
                  "--set", f"deployments.monitor.overrides={json.dumps(monitor_overrides)}",
                  "--set", "deployments.retrain.on_drift.delay_minutes=30"]
    first = run_cli(apply_args, cwd=project, PREFECT_API_URL=prefect_server, COLUMNS="250")
    assert first.returncode == 0, first.stdout + first.stderr
    assert re.search(r"work pool cpu \(process\) (created|up to date)", first.stdout), first.stdout
    assert f"{MONITOR}" in first.stdout and "* * * * * UTC" in first.stdout
    assert "on llmops.drift.detected, after 30 min" in first.stdout
    again = run_cli(apply_args, cwd=project, PREFECT_API_URL=prefect_server, COLUMNS="250")
    assert again.returncode == 0 and "work pool cpu (process) up to date" in again.stdout, again.stdout + again.stderr
    ours = [d for d in api(prefect_server, "POST", "/deployments/filter") if "llmops" in d["tags"]]
    assert sorted(d["name"] for d in ours) == sorted(f"{PIPELINE}-{k}" for k in
                                                     ("retrain", "monitor", "materialize", "retrain-notice"))
    automations = [a for a in api(prefect_server, "POST", "/automations/filter") if a["name"].startswith(PIPELINE)]
    assert len(automations) == 2, [a["name"] for a in automations]  # applied twice, still one each

    listed = run_cli(["deployments", "list"], cwd=project, PREFECT_API_URL=prefect_server, COLUMNS="250")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.count("│") > 5}
    assert "0 3 * * 1 UTC" in rows[RETRAIN] and f"{PIPELINE}: drift -> retrain" in rows[RETRAIN]
    assert "30 2 * * * UTC" in rows[f"llmops-materialize/{PIPELINE}-materialize"]

    # Started by hand, the monitor deployment runs through the worker.
    worker_log = worker()
    monitor = api(prefect_server, "GET", f"/deployments/name/{MONITOR}")
    started = api(prefect_server, "POST", f"/deployments/{monitor['id']}/create_flow_run")

    def finished(run_id=started["id"]):
        run = api(prefect_server, "GET", f"/flow_runs/{run_id}")
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    done = wait_for("the monitor run started by hand to finish", finished, 240, worker_log)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    # Its cron fires: a run the scheduler created completes through the worker too.
    auto = wait_for("a scheduled monitor run to complete", lambda: [
        r for r in runs_of(prefect_server, monitor["id"])
        if r["auto_scheduled"] and r["state"]["type"] == "COMPLETED"], 240, worker_log)
    assert auto[0]["parameters"]["overrides"] == monitor_overrides
    with sqlite_registry(feature_project["state"] / "mlflow", experiment="support-triage"):
        import mlflow

        monitored = mlflow.search_runs(experiment_names=["support-triage"],
                                       filter_string="tags.`llmops.kind` = 'monitor'")
        assert {"llmops.drifted"} <= {c.removeprefix("tags.") for c in monitored.columns}
        assert (monitored["tags.llmops.model_version"] == f"{DRIFT}/1").sum() >= 2

    # A drift alert of the pipeline's model: a retrain run is scheduled 30 min later, and the
    # notice names it and how to cancel it.
    marker = datetime.now(timezone.utc).isoformat()
    emitted = subprocess.run(
        [str(BIN / "prefect"), "events", "emit", "llmops.drift.detected",
         "--resource", json.dumps({"prefect.resource.id": f"llmops.model.{DRIFT}", "llmops.pipeline": PIPELINE}),
         "--payload", json.dumps({"model": f"{DRIFT}/1", "window": {"requests": 150, "first": marker, "last": marker},
                                  "signals": [{"name": "embeddings"}, {"name": "unseen_words"}]})],
        env=cli_env(PREFECT_API_URL=prefect_server), capture_output=True, text=True, timeout=120)
    assert emitted.returncode == 0, emitted.stdout + emitted.stderr
    retrain = api(prefect_server, "GET", f"/deployments/name/{RETRAIN}")
    [scheduled] = wait_for("the drift event to schedule a retrain run", lambda: [
        r for r in runs_of(prefect_server, retrain["id"])
        if (r["parameters"].get("trigger") or {}).get("window_first") == marker], 60)
    assert scheduled["state"]["type"] == "SCHEDULED"
    trigger = scheduled["parameters"]["trigger"]
    assert trigger["event"] == "llmops.drift.detected" and trigger["model"] == f"{DRIFT}/1"
    assert trigger["signals"] == "embeddings,unseen_words" and trigger["window_requests"] == "150"
    delay = (datetime.fromisoformat(scheduled["expected_start_time"]) - datetime.fromisoformat(marker)).total_seconds()
    assert 29 * 60 < delay < 31 * 60, delay
    [(path, notice)] = wait_for("the retrain notice at the webhook", lambda: [
        (p, b) for p, b in received if b.get("event") == "llmops.retrain.scheduled"], 180, worker_log)
    assert path == "/notice" and notice["flow_run_id"] == scheduled["id"] and notice["trigger"] == trigger
    assert notice["cancel"] == f"prefect flow-run cancel {scheduled['id']}" and "starts at" in notice["text"]

    cancelled = subprocess.run([str(BIN / "prefect"), *notice["cancel"].split()[1:]],
                               env=cli_env(PREFECT_API_URL=prefect_server), capture_output=True, text=True, timeout=120)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    state = wait_for("the retrain run to be cancelled", lambda: (
        s := api(prefect_server, "GET", f"/flow_runs/{scheduled['id']}")["state"])["type"] == "CANCELLED" and s, 60)
    assert state["type"] == "CANCELLED"
    # The retrain deployment runs the pipeline through the worker (here its first stage only):
    # first `llmops data from-traffic` over the request log, whose one feedback record (a
    # person confirming the first answer) becomes a ticket ingest adds beside the source;
    # the MLflow run says which drift alert caused it and what the traffic step did.
    labelled = tmp_path / "labelled"
    shutil.copytree(drift_traffic["ordinary"], labelled)
    request = next(json.loads(line) for f in sorted(labelled.glob("requests-*.jsonl"))
                   for line in f.read_text().splitlines() if line.strip() and json.loads(line).get("answer"))
    (labelled / f"feedback-{datetime.now(timezone.utc):%Y%m%dT%H}.jsonl").write_text(json.dumps({
        "feedback_id": "feedback-1", "time": datetime.now(timezone.utc).isoformat(), "request_id": request["request_id"],
        "answer": json.loads(request["answer"]), "who": "agent-7", "note": None, "model": f"{DRIFT}/1"}) + "\n")
    sliced = api(prefect_server, "POST", f"/deployments/{retrain['id']}/create_flow_run", parameters={
        **scheduled["parameters"], "start": "ingest", "until": "ingest",
        "overrides": [f"monitor.log={labelled}", f"serve.model={DRIFT}@champion"]})
    assert scheduled["parameters"]["from_traffic_hours"] == 168
    done = wait_for("the retrain run (ingest only) to finish", lambda: finished(sliced["id"]), 300, worker_log)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    with sqlite_registry(feature_project["state"] / "mlflow", experiment="support-triage"):
        [run] = mlflow.search_runs(experiment_names=["support-triage"], output_format="list",
                                   filter_string=f"tags.`llmops.trigger.event_id` = '{trigger['event_id']}'")
    assert run.data.tags["llmops.trigger.signals"] == "embeddings,unseen_words"
    assert run.data.tags["prefect.flow_run_id"] == sliced["id"] and retrain["id"] in run.data.tags["prefect.deployment"]
    assert run.data.tags["llmops.stages"] == "ingest" and run.info.status == "FINISHED"
    assert run.data.tags["llmops.from_traffic"].startswith("retrain on it"), run.data.tags["llmops.from_traffic"]
    ingested = json.loads((project / "artifacts" / PIPELINE / "ingest" / "metrics.json").read_text())
    assert ingested["tickets_by_origin"]["data/traffic"] == 1, ingested
    assert (project / "data" / "traffic.dvc").exists()

    clear_deployments(prefect_server)  # nothing left to fire after this test (the server serves the session)
