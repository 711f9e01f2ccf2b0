"""Drift alerts: what a monitoring run tells people, once per signal per cooldown.

The state file remembers, per signal, whether it is drifting and when it last alerted. A
run alerts about the signals that drift and have not alerted within ``cooldown_minutes``
(de-duplication: a signal that keeps drifting is not repeated every run), and sends a
"recovered" message for signals that drifted before and are now under their threshold;
after a recovery the next drift alerts at once. A signal with not enough data keeps its
state. Every channel is tried ``retries`` more times
with doubling waits; a channel that still fails is logged and counted in the result, and
the other channels and the monitoring go on.

Channels: ``file`` (JSON lines), ``webhook`` (the alert as JSON), ``slack`` (Slack's
incoming-webhook ``{"text": ...}``), ``email`` (SMTP). URLs, addresses and passwords come
from environment variables named in the spec; a channel whose variable is unset is skipped
and says so.
"""
from __future__ import annotations

import json
import logging
import os
import smtplib
import time
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage
from pathlib import Path

from components.base import write_json
from components.monitor.settings import AlertSpec, EmailChannel, FileChannel, WebhookChannel

log = logging.getLogger("llmops.monitor")


def decide(summary: dict, state: dict, cooldown_minutes: float, now: datetime) -> tuple[list[dict], list[dict], dict]:
    """(signals to alert, signals recovered, new state) for one run's summary."""
    new_state = {k: dict(v) for k, v in state.items()}
    alert, recovered = [], []
    for s in summary["signals"]:
        entry = new_state.setdefault(s["name"], {"drifting": False, "last_alert": None})
        if s["status"] == "drift":
            last = entry.get("last_alert")
            due = last is None or now - datetime.fromisoformat(last) >= timedelta(minutes=cooldown_minutes)
            if due:
                alert.append(s)
                entry["last_alert"] = now.isoformat(timespec="seconds")
            entry["drifting"] = True
        elif s["status"] == "ok":
            if entry.get("drifting"):
                recovered.append(s)
                entry["last_alert"] = None  # a new episode alerts at once (as Alertmanager does)
            entry["drifting"] = False
    return alert, recovered, new_state


def message(summary: dict, signals: list[dict], kind: str) -> dict:
    """The alert as data: model version, window, each signal with value and threshold, the report."""
    w = summary["window"]
    return {"event": f"llmops.drift.{kind}", "model": summary["model"], "time": summary["time"],
            "window": {"requests": w["requests"], "first": w["first"], "last": w["last"], "source": w["source"]},
            "signals": [{"name": s["name"], "value": s["value"], "threshold": s["threshold"], "statistic": s["statistic"],
                         "requests": s["n"], "detail": s["detail"]} for s in signals],
            "report": summary.get("report"), "summary": str(Path(summary["folder"]) / "summary.json")}


def text(alert: dict) -> str:
    if "text" in alert:  # a notice that is not a drift alert (e.g. a retrain scheduled) says it all itself
        return alert["text"]
    head = {"detected": "Drift detected", "recovered": "Drift recovered"}[alert["event"].rsplit(".", 1)[1]]
    w = alert["window"]
    lines = [f"{head} for {alert['model']} (window: {w['requests']} requests, {w['first']} .. {w['last']})"]
    for s in alert["signals"]:
        lines.append(f"- {s['name']}: {s['value']} (threshold {s['threshold']}; {s['statistic']})"
                     + (f"; {s['detail']}" if s["detail"] else ""))
    lines.append(f"report: {alert['report']}")
    return "\n".join(lines)


def dispatch(spec: AlertSpec, alerts: list[dict], default_file: Path) -> dict:
    """Send every alert on every channel. Returns {"sent": [...], "failed": [...], "skipped": [...]}."""
    outcome: dict[str, list] = {"sent": [], "failed": [], "skipped": []}
    for channel in spec.channels:
        name = _name(channel)
        missing = _missing_env(channel)
        if missing:
            outcome["skipped"].append(f"{name}: ${missing} is not set")
            continue
        for alert in alerts:
            error = None
            for attempt in range(spec.retries + 1):
                try:
                    _send(channel, alert, spec.timeout_s, default_file)
                    error = None
                    break
                except Exception as exc:  # noqa: BLE001 - a failing channel never stops monitoring
                    error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if attempt < spec.retries:
                        time.sleep(spec.backoff_s * 2 ** attempt)
            if error is None:
                outcome["sent"].append(f"{name}: {alert['event']}")
            else:
                log.warning("alert channel %s failed after %d tries: %s", name, spec.retries + 1, error)
                outcome["failed"].append(f"{name}: {error} (after {spec.retries + 1} tries)")
    return outcome


def _name(channel) -> str:
    if isinstance(channel, WebhookChannel):
        return f"{channel.kind} (${channel.url_env})"
    return channel.kind


def _missing_env(channel) -> str | None:
    if isinstance(channel, WebhookChannel):
        return None if os.environ.get(channel.url_env) else channel.url_env
    if isinstance(channel, EmailChannel):
        return next((v for v in (channel.host_env, channel.to_env) if not os.environ.get(v)), None)
    return None


def _send(channel, alert: dict, timeout_s: float, default_file: Path) -> None:
    if isinstance(channel, FileChannel):
        path = Path(channel.path) if channel.path else default_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(alert) + "\n")
    elif isinstance(channel, WebhookChannel):
        import httpx

        body = alert if channel.kind == "webhook" else {"text": text(alert)}
        response = httpx.post(os.environ[channel.url_env], json=body, timeout=timeout_s)
        if response.status_code >= 300:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    else:
        _email(channel, alert, timeout_s)


def _email(channel: EmailChannel, alert: dict, timeout_s: float) -> None:
    host, _, port = os.environ[channel.host_env].partition(":")
    msg = EmailMessage()
    if "subject" in alert:
        msg["Subject"] = f"[llmops] {alert['subject']}"
    else:
        names = ", ".join(s["name"] for s in alert["signals"])
        msg["Subject"] = (f"[llmops] {alert['model']}: drift {alert['event'].rsplit('.', 1)[1]} "
                          f"({names}; {alert['window']['requests']} requests)")
    msg["From"] = channel.sender
    msg["To"] = os.environ[channel.to_env]
    msg.set_content(text(alert))
    with smtplib.SMTP(host, int(port or 25), timeout=timeout_s) as smtp:
        if channel.starttls:
            smtp.starttls()
        user = os.environ.get(channel.username_env or "", "")
        if user:
            smtp.login(user, os.environ.get(channel.password_env or "", ""))
        smtp.send_message(msg)


def alert_run(spec: AlertSpec, summary: dict, state_file: Path, default_file: Path,
              now: datetime | None = None) -> dict:
    """Decide, send, remember. Returns the alerts sent (as data) and the channels' outcome."""
    now = now or datetime.now(timezone.utc)
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    fire, recovered, new_state = decide(summary, state.get(summary["model"], {}), spec.cooldown_minutes, now)
    alerts = ([message(summary, fire, "detected")] if fire else []) + \
             ([message(summary, recovered, "recovered")] if recovered else [])
    outcome = dispatch(spec, alerts, default_file) if alerts else {"sent": [], "failed": [], "skipped": []}
    if alerts and not outcome["sent"]:  # nobody was told: the next run tries again, cooldown or not
        for s in fire:
            new_state[s["name"]]["last_alert"] = state.get(summary["model"], {}).get(s["name"], {}).get("last_alert")
        for s in recovered:
            new_state[s["name"]]["drifting"] = True
    state[summary["model"]] = new_state
    write_json(state_file, state)
    still = [s["name"] for s in summary["signals"] if s["status"] == "drift" and s not in fire]
    return {"alerts": alerts, "suppressed": still, **outcome}
