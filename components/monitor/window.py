"""A window of the endpoint's request log (serving/records.py): the newest records of one
model version (or of every version), from a local folder or an ``s3://bucket/prefix``; and
the feedback records stored beside it (serving/feedback.py).

Files are ``requests-<UTC hour>[.<part>].jsonl``; they are read newest first until the
window is full. A line that is not a JSON object (a torn write, an edited file) is counted
and skipped with its file and line number; records of other versions are counted per
version, never mixed into this one's window. Feedback files are
``feedback-<UTC hour>.jsonl``; feedback comes after its request, so those of the window's
first hour and later are read.
"""
from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

from components.base import StageError

_NAME = re.compile(r"^requests-(\d{8}T\d{2})(?:\.(\d+))?\.jsonl$")
_FEEDBACK = re.compile(r"^feedback-(\d{8}T\d{2})(?:\.(\d+))?\.jsonl$")


@dataclass
class LogWindow:
    records: list[dict]  # oldest first
    source: str
    files: int = 0
    corrupt: list[str] = field(default_factory=list)  # "file:line: reason"
    other_versions: Counter = field(default_factory=Counter)
    other_routes: int = 0
    synthetic: int = 0  # a deploy's requests: shadow copies and smoke tests (serving/rollout.py)

    @property
    def span(self) -> tuple[str | None, str | None]:
        times = [r.get("time") for r in self.records if r.get("time")]
        return (min(times), max(times)) if times else (None, None)


def log_files(folder: Path) -> list[Path]:
    """The request log's files in ``folder``, newest first (hour, then part)."""
    found = [(m.group(1), int(m.group(2) or 0), p) for p in folder.glob("requests-*.jsonl")
             if (m := _NAME.match(p.name))]
    return [p for _, _, p in sorted(found, key=lambda t: (t[0], t[1]), reverse=True)]


def read_window(source: str, model: str | None, routes: list[str], last_requests: int | None, hours: float | None,
                s3_endpoint_url: str | None = None, now: datetime | None = None) -> LogWindow:
    """The newest records of ``model`` (``name/version``; None: every version) on ``routes``:
    at most ``last_requests``, none older than ``hours``. StageError when the log does not exist."""
    if source.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="llmops-monitor-") as tmp:
            oldest = ((now or datetime.now(timezone.utc)) - timedelta(hours=hours)).strftime("%Y%m%dT%H") if hours else ""
            _download(source, Path(tmp), s3_endpoint_url, oldest, _NAME)
            window = _read(Path(tmp), model, routes, last_requests, hours, now)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise StageError(f"request log {folder}: no such folder (has the endpoint served anything? "
                             "`llmops serve` writes it; monitor.log names another)")
        window = _read(folder, model, routes, last_requests, hours, now)
    window.source = source
    return window


def _read(folder: Path, model: str | None, routes: list[str], last_requests: int | None, hours: float | None,
          now: datetime | None) -> LogWindow:
    since = (now or datetime.now(timezone.utc)) - timedelta(hours=hours) if hours else None
    window = LogWindow(records=[], source=str(folder))
    for path in log_files(folder):
        window.files += 1
        kept = []
        for _, record in _records(path, window.corrupt):
            if record.get("shadow") or record.get("smoke"):  # a deploy's: a candidate's copy, a smoke test
                window.synthetic += 1
            elif record.get("route") not in routes:
                window.other_routes += 1
            elif model is not None and record.get("model") != model:
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


def read_feedback(source: str, since_hour: str, s3_endpoint_url: str | None = None) -> tuple[list[dict], list[str]]:
    """The feedback records stored beside the request log at ``source`` (a folder or
    ``s3://bucket/prefix``) in files of hour ``since_hour`` (``YYYYMMDDTHH``) and later, in
    the order they were written; and the lines that are not JSON objects ("file:line: reason")."""
    if source.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="llmops-feedback-") as tmp:
            _download(source, Path(tmp), s3_endpoint_url, since_hour, _FEEDBACK)
            return _read_feedback(Path(tmp), since_hour)
    return _read_feedback(Path(source), since_hour)


def _read_feedback(folder: Path, since_hour: str) -> tuple[list[dict], list[str]]:
    found = sorted((m.group(1), int(m.group(2) or 0), p) for p in folder.glob("feedback-*.jsonl")
                   if (m := _FEEDBACK.match(p.name)) and m.group(1) >= since_hour)
    records: list[dict] = []
    corrupt: list[str] = []
    for _, _, path in found:
        records += [record | {"_file": path.name, "_line": n} for n, record in _records(path, corrupt)]
    return records, corrupt


def _records(path: Path, corrupt: list[str]) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each JSON object line of ``path``; the other lines go to
    ``corrupt`` as "file:line: reason"."""
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            corrupt.append(f"{path.name}:{n}: {str(exc).splitlines()[0][:80]}")
            continue
        yield n, record


def _download(uri: str, into: Path, endpoint_url: str | None, oldest: str, pattern: re.Pattern) -> None:
    """Copy the files under ``s3://bucket/prefix`` whose names match ``pattern`` into
    ``into``, only those of hour ``oldest`` (``YYYYMMDDTHH``) and later ("": all)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from components.s3 import client

    bucket, _, prefix = uri[5:].rstrip("/").partition("/")
    s3 = client(endpoint_url, attempts=2, read_timeout_s=30)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"].rsplit("/", 1)[-1]
                m = pattern.match(name)
                if m and m.group(1) >= oldest:
                    s3.download_file(bucket, item["Key"], str(into / name))
    except (BotoCoreError, ClientError) as exc:
        raise StageError(f"request log {uri}: cannot read it: {str(exc).splitlines()[0]}") from None
