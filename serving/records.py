"""What the endpoint remembers: answers it can reuse (the response cache) and every request
it answered (the request log that monitoring reads).

The cache holds greedy answers only (temperature 0: the same prompt gives the same answer),
keyed by the model version and the full prompt's token ids plus what shapes the answer
(max_tokens, stop strings, JSON mode). A prompt holds everything the answer depends on, so
two different prompts never share an answer; another version never matches a key.

The request log appends one JSON line per request to ``requests-<UTC hour>.jsonl`` files in
its folder (a new file each hour, or sooner when one passes ``max_file_mib``), written by a
background thread: answering never waits for the disk. When its queue is full a record is
dropped and counted (``dropped``, and the endpoint's metrics), never silently. With an
``s3://`` target the same thread also ships the files there (S3Shipper): a file once it is
finished (the hour or size rolled over, or the log closed) and the current one every
``upload_every_s`` while it grows; a failed upload is logged and counted, and the file is
tried again with the next upload (the local file stays). Files written beside the log by
others (the feedback records, serving/feedback.py) are handed to it with ``ship_later``
and go with the same uploads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path

from cachetools import TTLCache

from components.pii import redact_text

# Set while a request is not a client's own (serving/rollout.py): "shadow" (a candidate's copy
# of a live request) or "smoke" (the deploy stage's smoke set). Its record is marked with that
# key (``"shadow": true``), monitoring skips it, and it costs no quota (serving/quota.py).
SYNTHETIC: ContextVar[str | None] = ContextVar("llmops_synthetic", default=None)

class ResponseCache:
    """A bounded, expiring map from request keys to finished answers (thread-safe)."""

    def __init__(self, max_entries: int, ttl_s: float):
        self.enabled = max_entries > 0
        self._entries: TTLCache = TTLCache(maxsize=max(1, max_entries), ttl=ttl_s)
        self._lock = threading.Lock()

    @staticmethod
    def key(model_id: str, prompt_ids: list[int], max_tokens: int, stop: list[str], json_only: bool | str) -> str:
        raw = json.dumps([model_id, prompt_ids, max_tokens, sorted(stop), json_only], separators=(",", ":"))
        return hashlib.sha256(raw.encode()).hexdigest()

    def get(self, key: str):
        if not self.enabled:
            return None
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, value) -> None:
        if self.enabled:
            with self._lock:
                self._entries[key] = value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class S3Shipper:
    """Copies request log files to ``s3://bucket/prefix/<file name>`` (boto3; credentials
    from the usual AWS_* variables; ``endpoint_url`` for an S3-compatible server)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, every_s: float = 60.0):
        if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
            raise ValueError(f"serve.request_log.s3_uri: {uri!r} is not s3://bucket[/prefix]")
        from components.s3 import client

        self.uri, self.every_s = uri.rstrip("/"), every_s
        self.bucket, _, self.prefix = uri[5:].rstrip("/").partition("/")
        self.client = client(endpoint_url, attempts=2, read_timeout_s=30)
        self.uploaded = self.errors = 0
        self.last_error: str | None = None

    def ship(self, path: Path) -> bool:
        """Upload ``path``; False (logged and counted) when it failed."""
        key = f"{self.prefix}/{path.name}" if self.prefix else path.name
        try:
            self.client.upload_file(str(path), self.bucket, key)
        except Exception as exc:  # noqa: BLE001 - a failing upload never stops the log
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            logging.getLogger("llmops.serving").warning("request log: upload of %s to %s failed: %s", path.name,
                                                        self.uri, self.last_error)
            return False
        self.uploaded += 1
        return True


class RequestLog:
    """Request records appended as JSON lines by a background thread."""

    def __init__(self, folder: Path, max_file_mib: float = 64, max_queue: int = 10_000, redact: bool = False,
                 shipper: S3Shipper | None = None):
        self.folder, self.max_bytes, self.redact = folder, int(max_file_mib * 2**20), redact
        folder.mkdir(parents=True, exist_ok=True)
        self.written = self.dropped = 0
        self.shipper = shipper
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._current: Path | None = None  # the file written last
        self._unshipped: set[Path] = set()  # files holding records S3 does not have yet
        self._handed: set[Path] = set()  # files other writers changed (ship_later), taken by the writer thread
        self._handed_lock = threading.Lock()
        self._shipped_at = time.monotonic()
        self._part = 0
        self._hour = ""
        self._thread = threading.Thread(target=self._drain, name="llmops-request-log", daemon=True)
        self._thread.start()

    def append(self, record: dict) -> bool:
        """Queue ``record``; False (and counted in ``dropped``) when the queue is full. A
        request that is not a client's own is marked (``"shadow": true``, ``"smoke": true``)."""
        if tag := SYNTHETIC.get():
            record = record | {tag: True}
        try:
            self._queue.put_nowait(record)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def ship_later(self, path: Path) -> None:
        """Ship ``path`` (a file beside the log, e.g. feedback) with the log's next upload."""
        if self.shipper is not None:
            with self._handed_lock:
                self._handed.add(path)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)

    def path(self) -> Path:
        """The file the next record goes to: this hour's, a new part once it is full."""
        hour = datetime.now(timezone.utc).strftime("%Y%m%dT%H")
        if hour != self._hour:
            self._hour, self._part = hour, 0
        current = self.folder / f"requests-{hour}{f'.{self._part}' if self._part else ''}.jsonl"
        if current.exists() and current.stat().st_size >= self.max_bytes:
            self._part += 1
            return self.path()
        return current

    def _drain(self) -> None:
        wait = self.shipper.every_s if self.shipper else None
        while True:
            try:
                record = self._queue.get(timeout=wait)
            except queue.Empty:  # idle: ship what the current file gained
                self._ship()
                continue
            if record is None:
                self._ship(force=True)
                return
            batch = [record]
            while len(batch) < 256:  # what else is waiting goes in the same write
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._write(batch)
                    self._ship(force=True)
                    return
                batch.append(nxt)
            self._write(batch)

    def _write(self, batch: list[dict]) -> None:
        lines = []
        for record in batch:
            if self.redact:
                record = redact_record(record)
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        target = self.path()
        finished = self._current is not None and target != self._current
        try:
            with target.open("a", encoding="utf-8") as f:
                f.writelines(lines)
            self.written += len(lines)
            self._current = target
            self._unshipped.add(target)
        except OSError:
            self.dropped += len(lines)
        self._ship(force=finished)  # a finished file goes at once

    def _ship(self, force: bool = False) -> None:
        """Upload every file with records S3 lacks (at most every ``upload_every_s`` unless
        ``force``); one that fails stays for the next time."""
        if self.shipper is None:
            return
        with self._handed_lock:
            self._unshipped |= self._handed
            self._handed.clear()
        if not self._unshipped:
            return
        if force or time.monotonic() - self._shipped_at >= self.shipper.every_s:
            self._unshipped = {path for path in sorted(self._unshipped) if not self.shipper.ship(path)}
            self._shipped_at = time.monotonic()


def redact_record(record: dict) -> dict:
    """The record with PII replaced in its messages' contents, its answer and a triage
    request's ticket fields."""
    out = dict(record)
    if isinstance(out.get("ticket"), dict):
        out["ticket"] = {k: redact_text(v)[0] if isinstance(v, str) else v for k, v in out["ticket"].items()}
    if isinstance(out.get("answer"), str):
        out["answer"] = redact_text(out["answer"])[0]
    if isinstance(out.get("messages"), list):
        out["messages"] = [m | {"content": redact_text(m["content"])[0]} if isinstance(m.get("content"), str) else m
                           for m in out["messages"]]
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def elapsed_ms(since: float) -> float:
    return round(1000 * (time.perf_counter() - since), 1)
