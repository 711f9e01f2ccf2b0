"""prepare: deterministic train/validation/test splits of chat-formatted examples.

Each ticket is joined with its customer's profile *as of the ticket's time* (the latest
snapshot at or before ``created_at``: a later plan change must not leak into training),
rendered with the spec's prompt template into a chat (system, user, assistant), and
assigned to a split by a hash of its ticket id, so a ticket keeps its split when data is
added or reordered. Each split file is written with its SHA-256 beside it.
"""
from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path

import pandas as pd
from pydantic import Field, field_validator, model_validator

from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table, write_json

SPLITS = ("train", "validation", "test")
OUTPUTS = tuple(f"{s}.jsonl" for s in SPLITS) + ("splits.json",)
LABELS = ("intent", "priority", "article_id")
PROFILE_FIELDS = ("plan", "tenure_days", "open_tickets_30d")
# Placeholders a prompt template may use.
TEMPLATE_FIELDS = ("ticket_id", "customer_id", "created_at", "channel", "subject", "body") + PROFILE_FIELDS

DEFAULT_SYSTEM = (
    "You triage support tickets for Tessera. Reply with one JSON object and nothing else: "
    '{"intent": ..., "priority": ..., "article_id": ...}.'
)
DEFAULT_TEMPLATE = (
    "Channel: {channel}\nCustomer plan: {plan} | tenure: {tenure_days} days | "
    "open tickets (30 d): {open_tickets_30d}\nSubject: {subject}\n\n{body}"
)


class SplitFractions(StrictModel):
    train: float = Field(0.8, gt=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitFractions":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must sum to 1 (got {total:g})")
        return self


class PrepareSpec(StrictModel):
    split: SplitFractions = SplitFractions()
    split_salt: str = "tessera-v1"
    system_prompt: str = Field(DEFAULT_SYSTEM, min_length=1)
    user_template: str = Field(DEFAULT_TEMPLATE, min_length=1)

    @field_validator("user_template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
        unknown = sorted(names - set(TEMPLATE_FIELDS))
        if unknown:
            raise ValueError(f"unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                             f"allowed: {', '.join(TEMPLATE_FIELDS)}")
        return value


def split_of(ticket_id: str, fractions: SplitFractions, salt: str) -> str:
    """The split a ticket belongs to: a stable function of its id (and the salt)."""
    digest = hashlib.sha256(f"{salt}:{ticket_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions.train:
        return "train"
    return "validation" if u < fractions.train + fractions.validation else "test"


def profiles_as_of(tickets: pd.DataFrame, profiles: pd.DataFrame) -> pd.DataFrame:
    """Tickets with the profile columns of the latest snapshot at or before ``created_at``
    (point-in-time join). Tickets older than their customer's first snapshot get nulls."""
    # Sources differ in time units (ms from JSON, ns from pandas); merge_asof needs one.
    utc_ns = "datetime64[ns, UTC]"
    left = tickets.assign(_order=range(len(tickets)),
                          created_at=pd.to_datetime(tickets.created_at, utc=True).astype(utc_ns))
    left = left.sort_values("created_at")
    right = profiles[["customer_id", "event_timestamp", *PROFILE_FIELDS]].assign(
        event_timestamp=pd.to_datetime(profiles.event_timestamp, utc=True).astype(utc_ns))
    right = right.sort_values("event_timestamp")
    joined = pd.merge_asof(left, right, left_on="created_at", right_on="event_timestamp",
                           by="customer_id", direction="backward")
    return joined.sort_values("_order").drop(columns=["_order", "event_timestamp"]).reset_index(drop=True)


def build_messages(row: dict, cfg: PrepareSpec) -> list[dict[str, str]]:
    """The system + user messages for one ticket (with profile fields); the prompt the model
    sees in training, evaluation and serving alike."""
    fields = {k: ("unknown" if row.get(k) is None or row.get(k) != row.get(k) else row[k])
              for k in TEMPLATE_FIELDS}
    for k in ("tenure_days", "open_tickets_30d"):
        if isinstance(fields[k], float):
            fields[k] = int(fields[k])
    return [{"role": "system", "content": cfg.system_prompt},
            {"role": "user", "content": cfg.user_template.format(**fields)}]


def answer_json(row: dict) -> str:
    """The gold answer as the model must write it: compact JSON, fixed key order."""
    return json.dumps({k: row[k] for k in LABELS}, ensure_ascii=False)


def run(cfg: PrepareSpec, io: StageIO) -> StageResult:
    """Write train/validation/test JSONL files and ``splits.json`` (counts and hashes).
    Raises StageError when tickets lack gold labels (they cannot be trained on)."""
    src = io.inputs["validate"]
    tickets = pd.read_parquet(src / "tickets.parquet")
    profiles = pd.read_parquet(src / "customer_profiles.parquet")
    unlabelled = tickets[tickets[list(LABELS)].isna().any(axis=1)]
    if len(unlabelled):
        raise StageError(f"{src / 'tickets.parquet'}: {len(unlabelled)} ticket(s) lack a gold label "
                         f"({', '.join(LABELS)}), e.g. {', '.join(unlabelled.ticket_id.head(3))}")
    joined = profiles_as_of(tickets, profiles)
    buckets: dict[str, list[str]] = {s: [] for s in SPLITS}
    for row in joined.to_dict("records"):
        row["created_at"] = row["created_at"].isoformat()
        example = {
            "ticket_id": row["ticket_id"],
            "messages": build_messages(row, cfg) + [{"role": "assistant", "content": answer_json(row)}],
            "labels": {k: row[k] for k in LABELS},
            "meta": {"channel": row["channel"], "plan": _none_if_nan(row["plan"]),
                     "customer_id": row["customer_id"], "created_at": row["created_at"]},
        }
        buckets[split_of(row["ticket_id"], cfg.split, cfg.split_salt)].append(
            json.dumps(example, ensure_ascii=False, sort_keys=True))
    io.out_dir.mkdir(parents=True, exist_ok=True)
    outputs, manifest = {}, {}
    for split in SPLITS:
        if not buckets[split] and split != "validation":
            raise StageError(f"prepare: split {split!r} is empty ({len(joined)} tickets); "
                             "use more data or larger fractions")
        path = io.out_dir / f"{split}.jsonl"
        path.write_text("".join(line + "\n" for line in buckets[split]), encoding="utf-8")
        outputs[split] = path
        manifest[split] = {"examples": len(buckets[split]), "sha256": file_sha256(path)}
    outputs["splits"] = write_json(io.out_dir / "splits.json", manifest)
    no_profile = int(joined["plan"].isna().sum())
    metrics = {f"n_{s}": manifest[s]["examples"] for s in SPLITS} | {"n_without_profile": no_profile}
    rows = [{"split": s, "examples": m["examples"], "sha256": m["sha256"][:12]} for s, m in manifest.items()]
    summary = (f"### prepare\n{len(joined)} tickets -> chat examples (profile as of ticket time; "
               f"{no_profile} without a profile)\n\n" + markdown_table(rows))
    return StageResult(outputs=outputs, metrics=metrics, summary=summary)


def _none_if_nan(value):
    return None if value is None or value != value else value


def read_examples(path: Path) -> list[dict]:
    """Read a split file written by :func:`run`."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
