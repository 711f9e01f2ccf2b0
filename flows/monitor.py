"""Drift monitoring as a Prefect flow: one run of `llmops monitor` (llmops/monitoring.py),
with its signal table as a Markdown artifact and each alert as a Prefect event
(``llmops.drift.detected`` / ``llmops.drift.recovered``, the alert in its payload, the
model as its resource) that an automation can act on, e.g. start a retraining run."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from components.base import markdown_table
from flows.pipeline import artifact_key
from llmops.monitoring import monitor_once
from llmops.runner import flow_setup


@flow(name="llmops-monitor", flow_run_name="monitor-{pipeline}")
def monitor_flow(spec_file: str = "pipelines.yaml", pipeline: str | None = None, model: str | None = None,
                 overrides: list[str] | None = None) -> dict:
    """Monitor the served version's traffic once; returns {"summary", "alerts"}."""
    logger = get_run_logger()
    spec, name, root = flow_setup(spec_file, list(overrides or []), pipeline)
    summary, outcome = monitor_once(spec, root, name, model, say=logger.info)
    rows = [{"signal": s["name"], "value": s["value"], "threshold": s["threshold"], "requests": s["n"],
             "drift": s["status"], "detail": s["detail"]} for s in summary["signals"]]
    create_markdown_artifact(
        key=artifact_key(name, "drift"),
        markdown=f"# Drift of {summary['model']}\n\nwindow: {summary['window']['requests']} requests "
                 f"({summary['window']['first']} .. {summary['window']['last']}); report: {summary['report']}\n\n"
                 + markdown_table(rows),
        description=f"drift monitoring of {summary['model']}")
    model_name = summary["model"].split("/")[0]
    for alert in outcome["alerts"]:
        emit_event(event=alert["event"], payload=alert,
                   resource={"prefect.resource.id": f"llmops.model.{model_name}",
                             "prefect.resource.name": summary["model"], "llmops.pipeline": name})
        logger.info("event %s: %s", alert["event"], ", ".join(s["name"] for s in alert["signals"]))
    return {"summary": summary, "alerts": outcome}
