"""The notice that a drift alert scheduled a retrain run: started by the same
``llmops.drift.detected`` event as the retrain automation, it finds the run that
automation scheduled (its ``trigger.event_id`` parameter is the event's id) and tells the
monitor's alert channels when it starts, why, and how to cancel it."""
from __future__ import annotations

import time
from datetime import datetime, timezone

from prefect import flow, get_run_logger

from components.monitor import alerts
from flows.deployments import deployment_name
from llmops.monitoring import monitor_folder
from llmops.runner import flow_setup


def find_scheduled_run(deployment: str, event_id: str, wait_s: float, poll_s: float = 2.0):
    """The flow run of ``deployment`` whose trigger parameter names ``event_id`` (None if
    none appears within ``wait_s``: the automation is off, or it fired no run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        only = DeploymentFilter(id=DeploymentFilterId(any_=[target.id]))
        while True:
            for run in client.read_flow_runs(deployment_filter=only, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=50):
                if (run.parameters.get("trigger") or {}).get("event_id") == event_id:
                    return run
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll_s)


def notice(pipeline: str, run, ui_url: str | None) -> dict:
    """The notice as the alert channels send it (JSON for a webhook; subject and text for the others)."""
    trigger = run.parameters.get("trigger") or {}
    starts = run.next_scheduled_start_time or run.expected_start_time
    link = f"{ui_url.rstrip('/')}/runs/flow-run/{run.id}" if ui_url else None
    in_minutes = (starts - datetime.now(timezone.utc)).total_seconds() / 60 if starts else None
    text = "\n".join(line for line in (
        f"Retraining of {pipeline} is scheduled: flow run {run.name} ({run.id}) starts at {starts:%Y-%m-%d %H:%M %Z}"
        + (f" (in {in_minutes:.0f} min)" if in_minutes is not None else ""),
        f"cause: drift alert {trigger.get('event_id')} for {trigger.get('model')} "
        f"(signals: {trigger.get('signals')}; window {trigger.get('window_first')} .. {trigger.get('window_last')})",
        f"to cancel it: prefect flow-run cancel {run.id}" + (f"  (or in the UI: {link})" if link else ""),
    ) if line)
    return {"event": "llmops.retrain.scheduled", "pipeline": pipeline, "model": trigger.get("model"),
            "flow_run_id": str(run.id), "flow_run_name": run.name, "starts": starts.isoformat() if starts else None,
            "trigger": trigger, "cancel": f"prefect flow-run cancel {run.id}", "url": link,
            "subject": f"{pipeline}: retraining scheduled at {starts:%H:%M %Z} after drift (cancel: {run.id})",
            "text": text}


@flow(name="llmops-retrain-notice", flow_run_name="retrain-notice-{pipeline}")
def retrain_notice_flow(spec_file: str = "pipelines.yaml", pipeline: str | None = None, event_id: str = "",
                        overrides: list[str] | None = None, wait_s: float = 120.0) -> dict:
    """Send the notice for the retrain run the drift event ``event_id`` scheduled; returns
    {"notice", "sent", "failed", "skipped"}."""
    from prefect.settings import PREFECT_UI_URL

    logger = get_run_logger()
    spec, name, root = flow_setup(spec_file, list(overrides or []), pipeline)
    run = find_scheduled_run(deployment_name("retrain", name), event_id, wait_s)
    if run is None:
        logger.warning("no retrain run was scheduled for drift event %s within %.0f s: nothing to announce",
                       event_id, wait_s)
        return {"notice": None, "sent": [], "failed": [], "skipped": []}
    message = notice(name, run, PREFECT_UI_URL.value())
    outcome = alerts.dispatch(spec.pipelines[name].monitor.alerts, [message],
                              monitor_folder(spec, root, name) / "alerts.jsonl")
    logger.info("%s\nsent: %s; failed: %s; skipped: %s", message["text"], outcome["sent"] or "none",
                outcome["failed"] or "none", outcome["skipped"] or "none")
    return {"notice": message, **outcome}
