"""POST /v1/feedback: a person's corrected answer for a request the endpoint answered.

    {"request_id": "triage-...", "answer": {"intent": ..., "priority": ..., "article_id": ...},
     "who": "agent-17", "note": "the customer is on the enterprise plan"}

The answer must be valid under the served version's answer schema (the task's JSON Schema):
a wrong one is a 422 naming the field and why. A stored record gets an id and a 201; it
is on disk before the answer goes out (appended and synced to ``feedback-<UTC hour>.jsonl``
in the request log's folder), and goes to the log's ``s3://`` prefix with the log's next
upload. ``llmops data from-traffic`` joins feedback to the logged requests by request id.

The request id is not looked up here: the request log is written in the background and may
live in S3 or on another replica, so a lookup would be slow and could miss a request that
was answered. Feedback naming a request the log does not hold is stored like any other and
reported when it is joined (``llmops data from-traffic`` lists it).
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.pii import redact_text
from serving.protocol import ApiError
from serving.records import RequestLog, now_iso

ROUTE = "/v1/feedback"


class FeedbackRequest(BaseModel):
    """The corrected answer for one answered request, and who gives it."""
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    answer: dict[str, Any]
    who: str = Field(min_length=1, max_length=200)
    note: str | None = Field(None, max_length=2000)

    @field_validator("who")
    @classmethod
    def _someone(cls, who: str) -> str:
        if not who.strip():
            raise ValueError("must name who gives the feedback (not blank)")
        return who.strip()


class FeedbackLog:
    """Feedback records as JSON lines beside a request log, written at once (flushed and
    synced: a 201 means the record is on disk) and shipped with the log's files."""

    def __init__(self, log: RequestLog):
        self.log, self.folder, self.redact = log, log.folder, log.redact
        self.written = 0
        self._lock = threading.Lock()

    def append(self, record: dict) -> Path:
        """Write ``record``; OSError when the disk refuses it."""
        if self.redact and record.get("note"):
            record = record | {"note": redact_text(record["note"])[0]}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        path = self.folder / f"feedback-{datetime.now(timezone.utc).strftime('%Y%m%dT%H')}.jsonl"
        with self._lock:
            with path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.written += 1
        self.log.ship_later(path)
        return path


def answer_problems(schema, answer: dict) -> list[str]:
    """Why ``answer`` is not valid under the served answer schema, each naming its field
    (``answer.priority: 'asap' is not one of [...]``); [] when it is valid."""
    return [f"answer{'' if e.startswith('(answer)') else '.'}{e.removeprefix('(answer)')}"
            for e in schema.errors(json.dumps(answer))]


def add_route(app: FastAPI, shared) -> None:
    """Register POST /v1/feedback on ``app`` (``shared``: serving.shared.Shared)."""
    served, metrics = shared.served, shared.metrics
    store = FeedbackLog(shared.log) if shared.log is not None else None

    @app.post(ROUTE, status_code=201)
    async def feedback_route(body: FeedbackRequest, request: HttpRequest):
        if store is None:
            raise ApiError(503, "feedback is stored beside the request log, which is off "
                                "(serve.request_log.enabled: false)", kind="service_unavailable",
                           code="feedback_unavailable")
        problems = answer_problems(served.schema, body.answer)
        if problems:
            metrics.feedback.labels("invalid_answer").inc()
            field = problems[0].split(":", 1)[0]
            raise ApiError(422, f"{'; '.join(problems)} (the answer must be valid under {served.id}'s answer schema)",
                           param=field, code="invalid_answer")
        fields = served.schema.fields
        record = {"feedback_id": f"feedback-{uuid.uuid4().hex}", "time": now_iso(), "request_id": body.request_id,
                  "answer": {f: body.answer[f] for f in fields}, "who": body.who, "note": body.note,
                  "model": served.id, "variant": served.variant, "key_id": getattr(request.state, "key_id", None)}
        try:
            path = await asyncio.to_thread(store.append, record)
        except OSError as exc:
            metrics.feedback.labels("not_stored").inc()
            raise ApiError(503, f"the feedback could not be stored ({exc.strerror or exc}); retry",
                           kind="service_unavailable", code="feedback_not_stored",
                           headers={"Retry-After": "5"}) from None
        metrics.feedback.labels("stored").inc()
        return JSONResponse({"id": record["feedback_id"], "object": "feedback", "created": int(time.time()),
                             "request_id": body.request_id, "model": served.id, "stored": path.name}, 201)
