"""Helpers of the component tests: chats in the shape prepare writes, prepare/ folders, and
the demo tables validate's tests break (the tiny model and its run are fixtures in
tests/conftest.py, shared with serving)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest


def chat_examples(n: int, offset: int = 0) -> list[dict]:
    """``n`` chats like prepare's: messages, gold labels, meta (channel, plan) for slices."""
    intents = ["billing_refund", "login_problem", "bug_report", "performance"]
    out = []
    for i in range(offset, offset + n):
        intent = intents[i % 4]
        labels = {"intent": intent, "priority": "low", "article_id": "KB-101"}
        out.append({"ticket_id": f"T{i}", "labels": labels,
                    "meta": {"channel": ("email", "chat")[i % 2], "plan": ("free", "pro", "enterprise")[i % 3]},
                    "messages": [
                        {"role": "system", "content": "Triage. Reply with JSON."},
                        {"role": "user", "content": f"Ticket {i}: something about {intent.replace('_', ' ')} "
                                                    + "x " * (i % 7)},
                        {"role": "assistant", "content": json.dumps(labels)}]})
    return out


def triage_examples(n: int, offset: int = 0) -> list[dict]:
    """``n`` chats rendered by the task's own prompt builder (default task), so the
    behavioural probes can parse and change their fields."""
    from components.task import TaskSpec, answer_json, build_messages

    plans = ("free", "starter", "pro", "enterprise")
    bodies = ("Hi team,\n\nWe were billed twice for the Boards widgets. Please refund it.\n\nThanks,\nAna Smith",
              "hey - I can't sign in to the sync app since this morning.",
              "Call summary: customer reports: the iOS app crashes on start.")
    intents = ("billing_refund", "login_problem", "bug_report")
    out = []
    for i in range(offset, offset + n):
        row = {"ticket_id": f"T{i}", "customer_id": f"C{i}", "created_at": "2026-05-01T00:00:00+00:00",
               "channel": ("email", "chat", "phone")[i % 3], "subject": f"Ticket number {i}", "body": bodies[i % 3],
               "plan": plans[i % 4], "tenure_days": 100, "open_tickets_30d": 1, "seats": 3, "new_customer": "no",
               "busy_account": "no", "account_weight": {"free": "-1", "enterprise": "+1"}.get(plans[i % 4], "+0"),
               "intent": intents[i % 3], "priority": "medium", "article_id": "KB-101"}
        articles = [{"article_id": "KB-101", "title": "Refunds and duplicate charges in Tessera Sync"}]
        out.append({"ticket_id": row["ticket_id"], "labels": {k: row[k] for k in ("intent", "priority", "article_id")},
                    "meta": {"channel": row["channel"], "plan": row["plan"]},
                    "messages": build_messages(row, TaskSpec(), articles)
                    + [{"role": "assistant", "content": answer_json(row, TaskSpec())}]})
    return out


ARTICLE_IDS = ["KB-101", "KB-102", "KB-201"]


def write_prepared(folder: Path, splits: dict[str, list[dict]], task=None) -> dict:
    """A prepare/ folder as the stage leaves it: split files, the answer schema (article ids
    as in the fixtures' chats) and its report."""
    from components.base import file_sha256
    from components.reports import PrepareReport, SplitInfo
    from components.task import AnswerSchema, TaskSpec

    folder.mkdir(parents=True, exist_ok=True)
    info = {}
    for split, examples in splits.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in examples))
        info[split] = SplitInfo(examples=len(examples), sha256=file_sha256(path))
    task = task or TaskSpec()
    values = {f: ARTICLE_IDS for f, a in task.answer.items() if a.values_from}
    AnswerSchema.of(task, values).write(folder / AnswerSchema.FILE)
    PrepareReport(splits=info, n_without_features=0).write(folder)
    return {s: i.model_dump() for s, i in info.items()}


def assert_fast_tokenizer(folder: Path) -> None:
    """``folder``'s tokenizer is written as the base model's conversion writes it: it loads as
    PreTrainedTokenizerFast from tokenizer.json alone, and there is no tokenizer.model."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast", folder
    assert config["model_input_names"] == ["input_ids", "attention_mask"] and config["padding_side"] == "left", folder
    assert not (folder / "tokenizer.model").exists(), folder


@pytest.fixture(scope="session")
def validate_tokenizer():
    """The model whose tokenizer validate's text check counts with, provisioned."""
    from components.catalog import pull
    from llmops.spec import load_spec
    from tests.conftest import REPO

    spec = load_spec(REPO / "pipelines.yaml", env={})
    pull("smollm2-135m-instruct", spec.models["smollm2-135m-instruct"], spec.state_dir(REPO))


@pytest.fixture
def data():
    """The demo tables, small: 300 tickets of 60 customers."""
    from components import generate

    return generate.generate(n_tickets=300, n_customers=60, seed=3)
