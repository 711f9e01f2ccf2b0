"""A window of the endpoint's request log (serving/records.py): the newest records of one
model version, from a local folder or an ``s3://bucket/prefix``.

Files are ``requests-<UTC hour>[.<part>].jsonl``; they are read newest first until the
window is full. A line that is not a JSON object (a torn write, an edited file) is counted
and skipped with its file and line number; records of other versions are counted per
version, never mixed into this one's window.
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from components.base import StageError

_NAME = re.compile(r"^requests-(\d{8}T\d{2})(?:\.(\d+))?\.jsonl$")


@dataclass
class LogWindow:
    records: list[dict]  # oldest first
    source: str
    files: int = 0
    corrupt: list[str] = field(default_factory=list)  # "file:line: reason"
    other_versions: Counter = field(default_factory=Counter)
    other_routes: int = 0

    @property
    def span(self) -> tuple[str | None, str | None]:
        times = [r.get("time") for r in self.records if r.get("time")]
        return (min(times), max(times)) if times else (None, None)


def log_files(folder: Path) -> list[Path]:
    """The request log's files in ``folder``, newest first (hour, then part)."""
    found = [(m.group(1), int(m.group(2) or 0), p) for p in folder.glob("requests-*.jsonl")
             if (m := _NAME.match(p.name))]
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def read_window(source: str, model: str, routes: list[str], last_requests: int | None, hours: float | None,
                s3_endpoint_url: str | None = None, now: datetime | None = None) -> LogWindow:
    """The newest records of ``model`` (``name/version``) on ``routes``: at most
    ``last_requests``, none older than ``hours``. StageError when the log does not exist."""
    if source.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="llmops-monitor-") as tmp:
            _download(source, Path(tmp), s3_endpoint_url, hours, now)
            window = _read(Path(tmp), model, routes, last_requests, hours, now)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise StageError(f"request log {folder}: no such folder (has the endpoint served anything? "
                             "`llmops serve` writes it; monitor.log names another)")
        window = _read(folder, model, routes, last_requests, hours, now)
    window.source = source
    return window


def _read(folder: Path, model: str, routes: list[str], last_requests: int | None, hours: float | None,
          now: datetime | None) -> LogWindow:
    since = (now or datetime.now(timezone.utc)) - timedelta(hours=hours) if hours else None
    window = LogWindow(records=[], source=str(folder))
    for path in log_files(folder):
        window.files += 1
        kept = []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                window.corrupt.append(f"{path.name}:{n}: {str(exc).splitlines()[0][:80]}")
                continue
            if record.get("route") not in routes:
                window.other_routes += 1
            elif record.get("model") != model:
                window.other_versions[str(record.get("model"))] += 1
            elif since is None or _parse_time(record.get("time")) >= since:
                kept.append(record)
        window.records = kept + window.records
        if last_requests is not None and len(window.records) >= last_requests:
            break
        if since is not None and kept and _parse_time(kept[0].get("time")) < since:
            break
    window.records.sort(key=lambda r: str(r.get("time") or ""))
    if last_requests is not None:
        window.records = window.records[-last_requests:]
    return window


def _parse_time(value) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)


def _download(uri: str, into: Path, endpoint_url: str | None, hours: float | None, now: datetime | None) -> None:
    """Copy the log files under ``s3://bucket/prefix`` into ``into`` (only the hours the
    window can reach, when it is a time span)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri[5:].rstrip("/").partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint_url or None, config=Config(
        retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30))
    oldest = ((now or datetime.now(timezone.utc)) - timedelta(hours=hours)).strftime("%Y%m%dT%H") if hours else ""
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                m = _NAME.match(name)
                if m and m.group(1) >= oldest:
                    s3.download_file(bucket, item["Key"], str(into / name))
    except (BotoCoreError, ClientError) as exc:
        raise StageError(f"request log {uri}: cannot read it: {str(exc).splitlines()[0]}") from None
