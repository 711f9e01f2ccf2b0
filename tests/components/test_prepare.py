"""prepare: split determinism, chat examples, hashes (on a Feast store built from small data)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from components import generate
from components.base import StageError, file_sha256
from components.reports import PrepareReport
from components.splits import SplitFractions, read_examples, split_of
from components.task import AnswerSchema, TaskSpec, build_messages, render_articles
from tests.conftest import build_features_and_prepare


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_small):
    root = tmp_path_factory.mktemp("prepared")
    _, result, io = build_features_and_prepare(root, demo_small)
    return result, root / "prepare"


def test_split_is_a_function_of_the_ticket_id():
    fr = SplitFractions()
    ids = [f"TCK-{i:06d}" for i in range(5000)]
    first = [split_of(i, fr, "s") for i in ids]
    assert first == [split_of(i, fr, "s") for i in reversed(ids)][::-1]
    shares = pd.Series(first).value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.02 and abs(shares["test"] - 0.1) < 0.015
    # another salt draws another split
    assert sum(a != split_of(i, fr, "other") for a, i in zip(first, ids)) > 1000


def test_adding_tickets_keeps_existing_splits():
    fr = SplitFractions()
    small = generate.generate(n_tickets=300, n_customers=60, seed=3).tickets.ticket_id
    big = generate.generate(n_tickets=600, n_customers=60, seed=3).tickets.ticket_id
    assert set(small) <= set(big)
    assert all(split_of(t, fr, "x") == split_of(t, fr, "x") for t in small)


def test_outputs_counts_and_hashes(prepared, demo_small):
    result, out = prepared
    report = result.report
    assert isinstance(report, PrepareReport)
    assert sum(m.examples for m in report.splits.values()) == 300
    for split, meta in report.splits.items():
        assert meta.sha256 == file_sha256(out / f"{split}.jsonl")
        assert len(read_examples(out / f"{split}.jsonl")) == meta.examples
        ids = {e["ticket_id"] for e in read_examples(out / f"{split}.jsonl")}
        assert all(split_of(t, SplitFractions(), "tessera-v1") == split for t in ids)
    assert report.retrieval_top_k == 3 and report.retrieval_recall["all"] >= 0.99
    # the answer schema, with the article ids of the data
    schema = AnswerSchema.read(out / AnswerSchema.FILE)
    assert schema.fields == ["intent", "priority", "article_id"]
    assert schema.values("article_id") == sorted(demo_small.articles.article_id)


def test_examples_are_chats_whose_answer_is_the_gold_json(prepared, demo_small):
    _, out = prepared
    examples = read_examples(out / "train.jsonl")
    tickets = demo_small.tickets.set_index("ticket_id")
    for ex in examples:
        assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
        answer = json.loads(ex["messages"][2]["content"])
        assert list(answer) == ["intent", "priority", "article_id"]
        row = tickets.loc[ex["ticket_id"]]
        assert answer == {"intent": row.intent, "priority": row.priority, "article_id": row.article_id}
        user = ex["messages"][1]["content"]
        assert row.subject in user and f"Channel: {row.channel}" in user
        assert len(ex["retrieved"]) == 3
        for article in ex["retrieved"]:
            assert f"- {article}: " in user


def test_ticket_before_any_profile_says_unknown():
    msgs = build_messages({"channel": "chat", "subject": "s", "body": "b", "plan": float("nan"),
                           "account_weight": None}, TaskSpec())
    assert "| plan: unknown | account weight: unknown\n" in msgs[1]["content"]
    assert msgs[1]["content"].endswith("Articles:\n- (none found)")


def test_articles_render_as_id_and_title():
    assert render_articles([{"article_id": "KB-101", "title": "Refunds"}, {"article_id": "KB-102", "title": "B"}]) \
        == "- KB-101: Refunds\n- KB-102: B"


def test_template_placeholders():
    with pytest.raises(ValidationError, match=r"placeholders must be plain names, got \{0\}"):
        TaskSpec(user_template="{0}: {body}")
    with pytest.raises(ValidationError, match="not a valid template"):
        TaskSpec(user_template="{body")
    with pytest.raises(StageError, match=r"placeholder \{mood\} is not a field of the request \(fields: body\)"):
        build_messages({"body": "b"}, TaskSpec(user_template="{mood}: {body}"))


def test_fractions_must_sum_to_one():
    with pytest.raises(ValidationError, match="must sum to 1 \\(got 0.9\\)"):
        SplitFractions(train=0.7, validation=0.1, test=0.1)


def test_unlabelled_tickets_stop_the_stage(tmp_path):
    data = generate.generate(n_tickets=50, n_customers=10, seed=1, shift="spam", shift_fraction=0.1)
    n_spam = int(data.tickets.intent.isna().sum())
    assert n_spam > 0
    with pytest.raises(StageError, match=f"{n_spam} ticket\\(s\\) lack a gold label"):
        build_features_and_prepare(tmp_path, data)
