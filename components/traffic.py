"""Labelled traffic: the endpoint's triage requests joined with the feedback people gave on
their answers (serving/feedback.py), as tables the pipeline ingests beside its original
data (``ingest.extra``). `llmops data from-traffic` writes them.

- ``tickets``: one row per request that got feedback, in the columns the demo generator
  writes (components/generate.py), the corrected answer as the labels; ``ticket_id`` is
  the request id (unique, unlike the ids clients send), ``created_at`` the time the
  request's features were read as of (its ``time``, else when it was answered); the
  generator's annotations the traffic cannot know (language, product, urgency, phrasing) are
  empty.
- ``origin``: where each row came from: the request id, the version and variant that
  answered and their answer, the ticket id the client sent, and the feedback (id, who,
  when, note, the version serving then), keyed by ``ticket_id``.

Joining: by request id; the latest feedback for a request wins (earlier ones are counted as
superseded). Skipped, each with its reason: feedback whose request is not in the window,
feedback whose answer the task's answer schema refuses, a request without the ticket
fields, and the same ticket (customer, subject, body) labelled twice (the latest feedback
is kept: the validate stage refuses duplicates).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from components import generate
from components.monitor.window import LogWindow
from components.tables import SCHEMA
from components.task import AnswerSchema

TABLES = ("tickets", "origin")
TICKET_FIELDS = tuple(c for c in SCHEMA["tickets"] if c not in ("ticket_id", "created_at"))
ORIGIN_COLUMNS = ("ticket_id", "request_id", "model", "variant", "requested_at", "served_answer", "client_ticket_id",
                  "feedback_id", "feedback_who", "feedback_at", "feedback_note", "feedback_model", "corrected")


@dataclass
class Joined:
    """What a join produced and why the rest was left out."""
    tickets: pd.DataFrame
    origin: pd.DataFrame
    requests: int  # triage requests in the window
    feedback: int  # feedback records read
    without_feedback: int  # requests in the window nobody gave feedback on
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> details

    def skip(self, reason: str, detail: str) -> None:
        self.skipped.setdefault(reason, []).append(detail)


def join(window: LogWindow, feedback: list[dict], schema: AnswerSchema) -> Joined:
    """The window's triage requests with their latest feedback, as tickets and origin rows."""
    requests = {r["request_id"]: r for r in window.records if r.get("request_id")}
    latest: dict[str, dict] = {}
    out = Joined(pd.DataFrame(), pd.DataFrame(), len(requests), len(feedback), 0)
    for fb in feedback:
        where = f"{fb.get('_file')}:{fb.get('_line')}"
        missing = [k for k in ("feedback_id", "request_id", "answer", "who", "time") if not fb.get(k)]
        if missing:
            out.skip("malformed feedback record", f"{where}: lacks {', '.join(missing)}")
            continue
        before = latest.get(fb["request_id"])
        if before is not None:
            old, new = sorted((before, fb), key=lambda r: str(r["time"]))
            out.skip("superseded by later feedback for the same request", f"{old['feedback_id']} "
                                                                          f"(request {old['request_id']})")
            fb = new
        latest[fb["request_id"]] = fb
    out.without_feedback = sum(1 for rid in requests if rid not in latest)
    rows, origins = [], []
    for rid, fb in sorted(latest.items(), key=lambda item: str(item[1]["time"])):
        label = f"{fb['feedback_id']} (request {rid})"
        request = requests.get(rid)
        if request is None:
            out.skip("request not in the window", label)
            continue
        answer = fb["answer"]
        problems = schema.errors(json.dumps(answer, ensure_ascii=False)) if isinstance(answer, dict) else ["not a JSON object"]
        if problems:
            out.skip("answer refused by the task's answer schema", f"{label}: {'; '.join(problems)}")
            continue
        ticket = request.get("ticket") if isinstance(request.get("ticket"), dict) else {}
        lacking = [f for f in TICKET_FIELDS if ticket.get(f) in (None, "")]
        if lacking:
            out.skip("request without the ticket's fields", f"{label}: lacks {', '.join(lacking)} "
                                                             f"(status {request.get('status')})")
            continue
        fields = {k: v for k, v in ticket.items() if k != "ticket_id"}
        rows.append({"ticket_id": rid, "created_at": request.get("features_as_of") or request.get("time"),
                     **fields, **{f: answer[f] for f in schema.fields}})
        served = schema.parse(request["answer"]) if isinstance(request.get("answer"), str) else None
        origins.append({"ticket_id": rid, "request_id": rid, "model": request.get("model"),
                        "variant": request.get("variant"), "requested_at": request.get("time"),
                        "served_answer": request.get("answer"), "client_ticket_id": _text(ticket.get("ticket_id")),
                        "feedback_id": fb["feedback_id"], "feedback_who": fb["who"], "feedback_at": fb["time"],
                        "feedback_note": fb.get("note"), "feedback_model": fb.get("model"),
                        "corrected": served != {f: answer[f] for f in schema.fields}})
    out.tickets, out.origin = tickets_table(rows, schema), origin_table(origins)
    return _one_row_per_ticket(out)


def merge(new: Joined, folder: Path, schema: AnswerSchema) -> Joined:
    """``new`` with the rows already written in ``folder`` (for --append): a request labelled
    in both keeps its latest feedback."""
    old_tickets, old_origin = (pd.read_parquet(folder / f"{t}.parquet") for t in TABLES)
    tickets = pd.concat([old_tickets, new.tickets], ignore_index=True)
    origin = pd.concat([old_origin, new.origin], ignore_index=True)
    origin = origin.drop_duplicates("feedback_id", keep="last")  # the same feedback read again
    order = origin.sort_values("feedback_at", kind="stable").drop_duplicates("request_id", keep="last")
    superseded = len(origin) - len(order)
    keep = tickets.drop_duplicates("ticket_id", keep="last").set_index("ticket_id").loc[order.ticket_id].reset_index()
    merged = Joined(tickets_table(keep.to_dict("records"), schema), origin_table(order.to_dict("records")),
                    new.requests, new.feedback, new.without_feedback, dict(new.skipped))
    if superseded:
        merged.skip("superseded by later feedback for the same request",
                    f"{superseded} row(s) already in {folder}")
    return _one_row_per_ticket(merged)


def tickets_table(rows: list[dict], schema: AnswerSchema) -> pd.DataFrame:
    """Rows as the generator's tickets table: its columns and types, in its order (then any
    other answer or ticket field)."""
    like = generate.generate(n_tickets=1, n_customers=1, seed=0).tickets
    columns = list(like.columns) + [f for f in schema.fields if f not in like.columns]
    columns += [c for row in rows for c in row if c not in columns]
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(columns)))
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
    return frame.astype({c: t for c, t in like.dtypes.items() if c != "created_at"}).astype(
        {"created_at": like.dtypes["created_at"]}).reset_index(drop=True)


def origin_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(ORIGIN_COLUMNS))
    for col in ("requested_at", "feedback_at"):
        frame[col] = pd.to_datetime(frame[col], utc=True, format="ISO8601")
    return frame.astype({"corrected": bool})


def _one_row_per_ticket(joined: Joined) -> Joined:
    """Keep the last row of the same ticket (customer, subject, body); the others are skipped."""
    dup = joined.tickets.duplicated(["customer_id", "subject", "body"], keep="last")
    dropped = set(joined.tickets.ticket_id[dup])
    for row in joined.origin[joined.origin.ticket_id.isin(dropped)].itertuples():
        joined.skip("same ticket (customer, subject, body) labelled again later",
                    f"{row.feedback_id} (request {row.request_id})")
    joined.tickets = joined.tickets[~dup].reset_index(drop=True)
    joined.origin = joined.origin[~joined.origin.ticket_id.isin(dropped)].reset_index(drop=True)
    return joined


def counts(joined: Joined) -> dict[str, int]:
    """Rows per answering version."""
    return dict(Counter(joined.origin.model.astype(str)))


def _text(value) -> str | None:
    return None if value is None else str(value)
