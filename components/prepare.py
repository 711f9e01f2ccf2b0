"""prepare: deterministic train/validation/test splits of chat-formatted examples.

Each ticket gets its customer's profile *as of the ticket's time* from Feast
(``get_historical_features``: a later plan change must not leak into training) and the
top-k help-center articles for its text from the vector store; both are rendered with the
spec's prompt template into a chat (system, user, assistant). The ticket goes to a split
by a hash of its id, so it keeps its split when data is added or reordered. Each split
file is written with its SHA-256 beside it. Serving builds prompts with the same
:func:`build_messages` (see components/features.py: online_context).
"""
from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path

import pandas as pd
from pydantic import Field, field_validator, model_validator

from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table, write_json
from components.features import SERVED_FEATURES

SPLITS = ("train", "validation", "test")
OUTPUTS = tuple(f"{s}.jsonl" for s in SPLITS) + ("splits.json",)
LABELS = ("intent", "priority", "article_id")
PROFILE_FIELDS = SERVED_FEATURES  # the customer features served by Feast (stored + on-demand)
# Placeholders a prompt template may use.
TEMPLATE_FIELDS = ("ticket_id", "customer_id", "created_at", "channel", "subject", "body") + PROFILE_FIELDS + (
    "articles",)

DEFAULT_SYSTEM = (
    "You triage support tickets for Tessera. Reply with one JSON object and nothing else: "
    '{"intent": ..., "priority": ..., "article_id": ...}.'
)
DEFAULT_TEMPLATE = (
    "Channel: {channel}\nCustomer plan: {plan} | new customer: {new_customer} | "
    "busy account: {busy_account}\nSubject: {subject}\n\n{body}\n\nCandidate articles:\n{articles}"
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


def ticket_text(ticket: dict) -> str:
    """The text retrieval searches with: subject and body."""
    return f"{ticket.get('subject') or ''}\n{ticket.get('body') or ''}"


def render_articles(articles: list[dict]) -> str:
    return "\n".join(f"- {a['article_id']}: {a['title']}" for a in articles) or "- (none found)"


def build_messages(row: dict, cfg: PrepareSpec, articles: list[dict] | None = None) -> list[dict[str, str]]:
    """The system + user messages for one ticket: its fields, the customer's profile and the
    retrieved articles, through the spec's template. Training, evaluation and serving all
    build prompts here, so they cannot drift apart."""
    fields = {k: ("unknown" if row.get(k) is None or row.get(k) != row.get(k) else row[k])
              for k in TEMPLATE_FIELDS if k != "articles"}
    for k in ("tenure_days", "open_tickets_30d", "seats"):
        if isinstance(fields[k], float):
            fields[k] = int(fields[k])
    fields["articles"] = render_articles(articles or [])
    return [{"role": "system", "content": cfg.system_prompt},
            {"role": "user", "content": cfg.user_template.format(**fields)}]


def answer_json(row: dict) -> str:
    """The gold answer as the model must write it: compact JSON, fixed key order."""
    return json.dumps({k: row[k] for k in LABELS}, ensure_ascii=False)


def run(cfg: PrepareSpec, io: StageIO) -> StageResult:
    """Write train/validation/test JSONL files and ``splits.json`` (counts and hashes).
    Raises StageError when tickets lack gold labels (they cannot be trained on)."""
    from components.features import Embedder, FeaturesSpec, Retriever, historical_profiles, open_store

    src = io.inputs["validate"]
    tickets = pd.read_parquet(src / "tickets.parquet")
    unlabelled = tickets[tickets[list(LABELS)].isna().any(axis=1)]
    if len(unlabelled):
        raise StageError(f"{src / 'tickets.parquet'}: {len(unlabelled)} ticket(s) lack a gold label "
                         f"({', '.join(LABELS)}), e.g. {', '.join(unlabelled.ticket_id.head(3))}")
    features_cfg: FeaturesSpec = io.sections.get("features", FeaturesSpec())
    store = open_store(io.feature_repo, io.state_dir, io.pipeline)
    profiles = historical_profiles(store, tickets)
    joined = pd.concat([tickets.reset_index(drop=True), profiles], axis=1)
    embedder = Embedder(features_cfg.embedding_model, io.models, io.state_dir, features_cfg.batch_size)
    rows = joined.to_dict("records")
    retrieved = Retriever(store, embedder, features_cfg.top_k).search([ticket_text(r) for r in rows], progress=True)
    buckets: dict[str, list[str]] = {s: [] for s in SPLITS}
    hits: dict[str, list[bool]] = {s: [] for s in SPLITS}
    for row, articles in zip(rows, retrieved):
        row["created_at"] = pd.Timestamp(row["created_at"]).isoformat()
        split = split_of(row["ticket_id"], cfg.split, cfg.split_salt)
        example = {
            "ticket_id": row["ticket_id"],
            "messages": build_messages(row, cfg, articles) + [{"role": "assistant", "content": answer_json(row)}],
            "labels": {k: row[k] for k in LABELS},
            "retrieved": [a["article_id"] for a in articles],
            "meta": {"channel": row["channel"], "plan": _none_if_nan(row["plan"]),
                     "customer_id": row["customer_id"], "created_at": row["created_at"]},
        }
        buckets[split].append(json.dumps(example, ensure_ascii=False, sort_keys=True))
        hits[split].append(row["article_id"] in example["retrieved"])
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
    all_hits = [h for s in SPLITS for h in hits[s]]
    k = features_cfg.top_k
    metrics = {f"n_{s}": manifest[s]["examples"] for s in SPLITS} | {
        "n_without_profile": no_profile,
        f"retrieval_recall_at_{k}": round(sum(all_hits) / len(all_hits), 4),
        **{f"retrieval_recall_at_{k}_{s}": round(sum(hits[s]) / len(hits[s]), 4) for s in SPLITS if hits[s]},
    }
    table = [{"split": s, "examples": m["examples"], "sha256": m["sha256"][:12],
              f"recall@{k}": f"{sum(hits[s]) / max(len(hits[s]), 1):.3f}"} for s, m in manifest.items()]
    summary = (f"### prepare\n{len(joined)} tickets -> chat examples with the profile as of the ticket's time "
               f"(Feast; {no_profile} without a profile) and the top {k} retrieved articles "
               f"(recall@{k} {metrics[f'retrieval_recall_at_{k}']:.3f}).\n\n" + markdown_table(table))
    return StageResult(outputs=outputs, metrics=metrics, summary=summary)


def _none_if_nan(value):
    return None if value is None or value != value else value


def read_examples(path: Path) -> list[dict]:
    """Read a split file written by :func:`run`."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
