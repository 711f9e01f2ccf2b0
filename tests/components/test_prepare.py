"""prepare: split determinism, point-in-time profiles, chat examples, hashes."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from components import generate
from components.base import StageError, StageIO, file_sha256
from components.prepare import PrepareSpec, SplitFractions, build_messages, read_examples, run, split_of


def _run_prepare(tmp_path, data, cfg=PrepareSpec()):
    ingest_dir = tmp_path / "ingest"
    data.write(ingest_dir)
    out = tmp_path / "prepare"
    return run(cfg, StageIO(pipeline="t", out_dir=out, inputs={"validate": ingest_dir})), out


def test_split_is_a_function_of_the_ticket_id():
    fr = SplitFractions()
    ids = [f"TCK-{i:06d}" for i in range(5000)]
    first = [split_of(i, fr, "s") for i in ids]
    assert first == [split_of(i, fr, "s") for i in reversed(ids)][::-1]
    shares = pd.Series(first).value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.02 and abs(shares["test"] - 0.1) < 0.015
    # another salt draws another split
    assert sum(a != split_of(i, fr, "other") for a, i in zip(first, ids)) > 1000


def test_adding_tickets_keeps_existing_splits(tmp_path, demo_small):
    result, out = _run_prepare(tmp_path / "a", demo_small)
    before = {e["ticket_id"]: s for s in ("train", "validation", "test") for e in read_examples(out / f"{s}.jsonl")}
    bigger = generate.generate(n_tickets=600, n_customers=60, seed=3)
    _, out2 = _run_prepare(tmp_path / "b", bigger)
    after = {e["ticket_id"]: s for s in ("train", "validation", "test") for e in read_examples(out2 / f"{s}.jsonl")}
    assert all(after[t] == s for t, s in before.items() if t in after)
    assert len(set(before) & set(after)) == 300


def test_outputs_counts_and_hashes(tmp_path, demo_small):
    result, out = _run_prepare(tmp_path, demo_small)
    manifest = json.loads((out / "splits.json").read_text())
    assert sum(m["examples"] for m in manifest.values()) == 300
    for split, meta in manifest.items():
        assert meta["sha256"] == file_sha256(out / f"{split}.jsonl")
        assert len(read_examples(out / f"{split}.jsonl")) == meta["examples"]
    assert result.metrics["n_train"] == manifest["train"]["examples"]
    # same input, byte-identical output
    _, out2 = _run_prepare(tmp_path / "again", demo_small)
    assert file_sha256(out2 / "train.jsonl") == manifest["train"]["sha256"]


def test_examples_are_chats_whose_answer_is_the_gold_json(tmp_path, demo_small):
    _, out = _run_prepare(tmp_path, demo_small)
    examples = read_examples(out / "train.jsonl")
    tickets = demo_small.tickets.set_index("ticket_id")
    for ex in examples:
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["system", "user", "assistant"]
        answer = json.loads(ex["messages"][2]["content"])
        assert list(answer) == ["intent", "priority", "article_id"]
        row = tickets.loc[ex["ticket_id"]]
        assert answer == {"intent": row.intent, "priority": row.priority, "article_id": row.article_id}
        assert row.subject in ex["messages"][1]["content"]


def test_prompt_shows_the_plan_as_of_the_ticket_not_the_latest(tmp_path):
    t0, t1, t2 = (pd.Timestamp(x, tz="UTC") for x in ("2026-01-01", "2026-02-01", "2026-03-01"))
    data = generate.generate(n_tickets=40, n_customers=5, seed=1)
    data.customer_profiles = pd.DataFrame([
        {"customer_id": c, "event_timestamp": t0, "plan": "free", "tenure_days": 100, "open_tickets_30d": 0, "seats": 1}
        for c in data.customers.customer_id] + [
        {"customer_id": c, "event_timestamp": t2, "plan": "enterprise", "tenure_days": 159, "open_tickets_30d": 4,
         "seats": 50} for c in data.customers.customer_id])
    data.tickets["created_at"] = t1
    cfg = PrepareSpec(split=SplitFractions(train=0.5, validation=0.0, test=0.5))
    _, out = _run_prepare(tmp_path, data, cfg)
    users = [e["messages"][1]["content"] for s in ("train", "test") for e in read_examples(out / f"{s}.jsonl")]
    assert len(users) == 40
    assert all("plan: free | tenure: 100 days | open tickets (30 d): 0" in u for u in users)


def test_ticket_before_any_profile_says_unknown():
    cfg = PrepareSpec()
    msgs = build_messages({"channel": "chat", "subject": "s", "body": "b", "plan": float("nan"),
                           "tenure_days": None, "open_tickets_30d": float("nan")}, cfg)
    assert "plan: unknown | tenure: unknown days" in msgs[1]["content"]


def test_unknown_template_placeholder_is_refused():
    with pytest.raises(ValidationError, match=r"unknown placeholder\(s\) \{mood\}"):
        PrepareSpec(user_template="{mood}: {body}")


def test_fractions_must_sum_to_one():
    with pytest.raises(ValidationError, match="must sum to 1 \\(got 0.9\\)"):
        SplitFractions(train=0.7, validation=0.1, test=0.1)


def test_unlabelled_tickets_stop_the_stage(tmp_path):
    data = generate.generate(n_tickets=50, n_customers=10, seed=1, shift="spam", shift_fraction=0.1)
    n_spam = int(data.tickets.intent.isna().sum())
    assert n_spam > 0
    with pytest.raises(StageError, match=f"{n_spam} ticket\\(s\\) lack a gold label"):
        _run_prepare(tmp_path, data)
