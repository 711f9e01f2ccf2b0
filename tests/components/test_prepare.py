"""prepare: split determinism, chat examples, hashes, the held-out unseen phrasing (on a
Feast store built from small data)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from components import generate
from components.base import StageError, file_sha256
from components.reports import PrepareReport
from components.splits import SplitFractions, assign, read_examples, split_of
from components.task import AnswerSchema, TaskSpec, build_messages, render_articles
from tests.conftest import build_features_and_prepare


@pytest.fixture(scope="module")
def demo_unseen() -> generate.DemoData:
    """The small demo data with a tenth of its tickets in the unseen phrasing."""
    return generate.generate(n_tickets=300, n_customers=60, seed=3, unseen_share=0.1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, demo_unseen):
    root = tmp_path_factory.mktemp("prepared")
    _, result, io = build_features_and_prepare(root, demo_unseen)
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


def test_outputs_counts_and_hashes(prepared, demo_unseen):
    result, out = prepared
    report = result.report
    assert isinstance(report, PrepareReport)
    assert sum(m.examples for m in report.splits.values()) == 300
    for split, meta in report.splits.items():
        assert meta.sha256 == file_sha256(out / f"{split}.jsonl")
        assert len(read_examples(out / f"{split}.jsonl")) == meta.examples
        ids = {e["ticket_id"] for e in read_examples(out / f"{split}.jsonl")}
        held_out = set(demo_unseen.tickets.ticket_id[demo_unseen.tickets.phrasing == "unseen"])
        assert all(split_of(t, SplitFractions(), "tessera-v1") == split for t in ids - held_out)
    assert report.retrieval_top_k == 3 and report.retrieval_recall["all"] >= 0.99
    # the answer schema, with the article ids of the data
    schema = AnswerSchema.read(out / AnswerSchema.FILE)
    assert schema.fields == ["intent", "priority", "article_id"]
    assert schema.values("article_id") == sorted(demo_unseen.articles.article_id)


def test_unseen_phrasing_goes_to_the_test_split_only(prepared, demo_unseen):
    _, out = prepared
    phrasing = dict(zip(demo_unseen.tickets.ticket_id, demo_unseen.tickets.phrasing))
    metas = {split: [e["meta"] for e in read_examples(out / f"{split}.jsonl")]
             for split in ("train", "validation", "test")}
    for split in ("train", "validation"):
        assert metas[split] and {m["phrasing"] for m in metas[split]} == {"seen"}
    test = read_examples(out / "test.jsonl")
    unseen = [e["ticket_id"] for e in test if e["meta"]["phrasing"] == "unseen"]
    assert sorted(unseen) == sorted(t for t, p in phrasing.items() if p == "unseen") and len(unseen) == 30
    # the seen test chats are those the hash picks, as without the slice
    assert {e["ticket_id"] for e in test} - set(unseen) == {
        t for t, p in phrasing.items() if p == "seen" and split_of(t, SplitFractions(), "tessera-v1") == "test"}
    assert all(set(m) == {"channel", "plan", "phrasing"} for m in metas["test"])


def test_assign_holds_out_listed_values_only():
    fr, test_only = SplitFractions(), {"phrasing": ["unseen"]}
    ids = [f"TCK-{i:06d}" for i in range(200)]
    assert {assign({"ticket_id": t, "phrasing": "unseen"}, fr, "s", test_only) for t in ids} == {"test"}
    for row in ({"phrasing": "seen"}, {"phrasing": None}, {"phrasing": pd.NA}, {}):  # e.g. traffic rows: no phrasing
        assert [assign({"ticket_id": t, **row}, fr, "s", test_only) for t in ids] == [split_of(t, fr, "s") for t in ids]
    assert [assign({"ticket_id": t, "phrasing": "unseen"}, fr, "s", {}) for t in ids] == [split_of(t, fr, "s")
                                                                                            for t in ids]


def test_examples_are_chats_whose_answer_is_the_gold_json(prepared, demo_unseen):
    _, out = prepared
    examples = read_examples(out / "train.jsonl")
    tickets = demo_unseen.tickets.set_index("ticket_id")
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
