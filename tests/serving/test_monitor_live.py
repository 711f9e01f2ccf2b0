"""Drift monitoring end to end: a version registered on the feature project's prepared
data is served; ordinary then shifted (Spanish) tickets go through /v1/triage as real HTTP
requests; `llmops monitor` (the CLI, as a Prefect flow on a real Prefect server) reads the
request log, and its alerts must reach a real local webhook and SMTP server, once per
cooldown, with a Prefect event."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from tests.conftest import run_cli, sqlite_registry
from tests.serving.conftest import DRIFT

# Small windows (tens of requests): judge on 20; the tiny random model's labels mean nothing,
# so the label signal is off here (it is tested on generated answers in test_monitor.py).
SETTINGS = ["--set", "monitor.signals.answer_labels.enabled=false",
            *[x for s in ("prompt_tokens", "unseen_words", "frequent_words", "embeddings")
              for x in ("--set", f"monitor.signals.{s}.min_window=20")],
            "--set", "monitor.alerts.cooldown_minutes=60", "--set", "monitor.alerts.retries=0"]


def monitor(project: Path, log: Path, prefect_server: str, env: dict, *args: str):
    """`llmops monitor` as a user runs it: the CLI, its flow on the Prefect server."""
    return run_cli(["monitor", "--model", f"{DRIFT}@champion", "--set", f"monitor.log={log}", *SETTINGS, *args],
                   cwd=project, PREFECT_API_URL=prefect_server, COLUMNS="200", **env)


def monitor_here(project: Path, log: Path, last: int) -> tuple[dict, dict]:
    """The same run in this process, without Prefect (llmops/monitoring.py)."""
    from llmops.monitoring import monitor_once
    from llmops.spec import load_spec

    overrides = [o for o in SETTINGS if o != "--set"] + [f"monitor.log={log}", f"monitor.window.last_requests={last}"]
    spec = load_spec(project / "pipelines.yaml", [f"pipelines.support-triage.{o}" for o in overrides])
    with sqlite_registry(project / ".llmops" / "mlflow", experiment="support-triage"):
        return monitor_once(spec, project, "support-triage", f"{DRIFT}@champion", say=lambda line: None)


def drift_events(prefect_server: str, timeout_s: float = 60) -> list[dict]:
    """The server's llmops.drift events of drift-triage/1, once there are any: the server
    stores events in the background, a moment after it accepted them."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = httpx.post(f"{prefect_server}/events/filter",
                            json={"filter": {"event": {"prefix": ["llmops.drift"]}}}, timeout=30)
        found = [e for e in events.json()["events"] if e["payload"].get("model") == f"{DRIFT}/1"]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_shifted_traffic_alerts_once_on_webhook_smtp_and_prefect(drift_traffic, feature_project, prefect_server,
                                                                  webhook, smtp, monkeypatch):
    url, received = webhook
    host, inbox = smtp
    env = {"LLMOPS_ALERT_WEBHOOK_URL": f"{url}/drift", "LLMOPS_SMTP_HOST": host,
           "LLMOPS_ALERT_EMAIL_TO": "oncall@example.test"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    project, n, log_dir = feature_project["project"], drift_traffic["n"], drift_traffic["shifted"]
    summary, outcome = monitor_here(project, drift_traffic["ordinary"], n)
    assert summary["window"]["requests"] == n and summary["reference"]["found_at"] == "registry run"
    assert summary["drifted"] == [] and outcome["alerts"] == [] and received == [] and inbox == [], summary

    shifted = monitor(project, log_dir, prefect_server, env, "--last", str(n), "--fail-on-drift")
    assert shifted.returncode == 3, shifted.stdout + shifted.stderr  # drift, with --fail-on-drift
    rows = {line.split("│")[1].strip(): line for line in shifted.stdout.splitlines() if line.count("│") > 5}
    assert "yes" in rows["unseen_words"] and "yes" in rows["frequent_words"], shifted.stdout
    assert "alert sent: webhook ($LLMOPS_ALERT_WEBHOOK_URL): llmops.drift.detected" in shifted.stdout
    assert "alert channel skipped: slack ($LLMOPS_SLACK_WEBHOOK_URL)" in shifted.stdout
    [(path, alert)] = received
    assert path == "/drift" and alert["event"] == "llmops.drift.detected" and alert["model"] == f"{DRIFT}/1"
    drifted = {s["name"]: s for s in alert["signals"]}
    assert drifted["unseen_words"]["value"] > drifted["unseen_words"]["threshold"]
    assert alert["window"]["requests"] == n and Path(alert["report"]).stat().st_size > 10_000
    assert len(inbox) == 1 and f"{DRIFT}/1: drift detected" in inbox[0]["Subject"]
    assert "unseen_words" in inbox[0].get_payload()

    [event] = drift_events(prefect_server)
    assert event["event"] == "llmops.drift.detected" and event["resource"]["prefect.resource.id"] == f"llmops.model.{DRIFT}"
    assert {s["name"] for s in event["payload"]["signals"]} == set(drifted)

    summary, outcome = monitor_here(project, log_dir, n)  # inside the cooldown
    assert set(summary["drifted"]) == set(drifted) and outcome["alerts"] == []
    assert outcome["suppressed"] == summary["drifted"] and len(received) == 1 and len(inbox) == 1
    history = [json.loads(line) for line in (feature_project["state"] / "monitor" / "support-triage" /
                                             "history.jsonl").read_text().splitlines()]
    assert [bool(h["drifted"]) for h in history[-3:]] == [False, True, True]
    with sqlite_registry(feature_project["state"] / "mlflow", experiment="support-triage"):
        import mlflow

        runs = mlflow.search_runs(experiment_names=["support-triage"], filter_string="tags.`llmops.kind` = 'monitor'")
        assert len(runs) == 3 and set(runs["tags.llmops.model_version"]) == {f"{DRIFT}/1"}
        assert sorted(runs["metrics.drift.unseen_words"])[-1] == drifted["unseen_words"]["value"]
        tags = mlflow.MlflowClient().get_model_version(DRIFT, "1").tags
        assert tags["monitor.last_run"] in set(runs["run_id"])
