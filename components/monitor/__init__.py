"""Drift monitoring of the endpoint's live traffic (``llmops monitor``; flows/monitor.py).

settings.py   the ``monitor`` section of pipelines.yaml
window.py     a window of the request log (local folder or s3://)
reference.py  the served version's own training prompts, found by their recorded hashes
signals.py    the signals (Evidently 0.7) and their verdicts
job.py        one run: signals, HTML report, summary, history, Evidently workspace
alerts.py     cooldown, de-duplication, recovery, and the channels (file, webhook, Slack, e-mail)
"""
