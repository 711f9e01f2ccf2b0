"""evaluate: answer parsing on good and malformed outputs, the metrics on constructed
answers, and the stage on a tiny model (candidate and base, the base result cached)."""
from __future__ import annotations

import json

import pytest

from components.base import StageError, StageIO
from components.evaluate import (INVALID, EvaluateSpec, confusion, parse_answer, percentile, run, score,
                                 slice_metrics)
from components.finetune import FinetuneSpec, train
from tests.components.conftest import chat_examples

GOLD = {"intent": "billing_refund", "priority": "high", "article_id": "KB-101"}


@pytest.mark.parametrize(("text", "parsed"), [
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-101"}', GOLD),
    ('  {"article_id": "KB-101", "intent": "billing_refund", "priority": "high"}\n', GOLD),  # order, whitespace
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-101"} thanks!', None),  # trailing text
    ('{"intent": "billing_refund", "priority": "high"}', None),  # missing key
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-101", "x": 1}', None),  # extra key
    ('{"intent": "billing_refund", "priority": 2, "article_id": "KB-101"}', None),  # not a string
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-1', None),  # cut off
    ('["billing_refund", "high", "KB-101"]', None),  # not an object
    ('```json\n{"intent": "billing_refund", "priority": "high", "article_id": "KB-101"}\n```', None),  # fenced
    ("", None),
    ("[" * 5000, None),  # deep nesting must not crash the parser
])
def test_parse_answer(text, parsed):
    assert parse_answer(text) == parsed


def test_score_counts_each_field_and_exact_match():
    golds = [GOLD, GOLD, {**GOLD, "intent": "bug_report"}, GOLD]
    answers = [json.dumps(GOLD),                                   # all right
               json.dumps({**GOLD, "priority": "low"}),             # priority wrong
               json.dumps(GOLD),                                    # intent wrong
               "I think it is a billing issue"]                     # invalid
    assert score(golds, answers) == {"n": 4, "json_valid_rate": 0.75, "intent_accuracy": 0.5,
                                     "priority_accuracy": 0.5, "article_accuracy": 0.75, "exact_match": 0.25}
    with pytest.raises(ValueError, match="4 gold labels but 3 answers"):
        score(golds, answers[:3])


def test_slices_and_confusion():
    golds = [GOLD, GOLD, {**GOLD, "intent": "bug_report"}]
    answers = [json.dumps(GOLD), "nope", json.dumps(GOLD)]
    metas = [{"channel": "email", "plan": "pro"}, {"channel": "email", "plan": "free"}, {"channel": "chat"}]
    slices = slice_metrics(metas, golds, answers, ["channel", "plan"])
    assert slices["channel"] == {"chat": {"n": 1, "exact_match": 0.0}, "email": {"n": 2, "exact_match": 0.5}}
    assert slices["plan"]["None"] == {"n": 1, "exact_match": 0.0}
    assert confusion(golds, answers) == {("billing_refund", "billing_refund"): 1, ("billing_refund", INVALID): 1,
                                         ("bug_report", "billing_refund"): 1}


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)


@pytest.fixture(scope="module")
def stage_inputs(tiny, tmp_path_factory):
    """prepare's test split and a tiny adapter trained a few steps, as the stage reads them."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "prepare").mkdir()
    examples = chat_examples(10)
    (root / "prepare" / "test.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    cfg = FinetuneSpec(base_model=str(tiny), max_steps=4, batch_size=4, learning_rate=5e-3, warmup_steps=1,
                       eval_every=2, eval_examples=4, seed=1)
    train(cfg, str(tiny), chat_examples(16, offset=100), chat_examples(4, offset=200), root / "finetune",
          root / "ckpt", progress=False)
    return root, cfg


def _io(root, cfg, name):
    out = root / name
    out.mkdir()
    return StageIO(pipeline="t", out_dir=out, inputs={"prepare": root / "prepare", "finetune": root / "finetune"},
                   state_dir=root / "state", sections={"finetune": cfg})


def test_stage_scores_candidate_and_base_and_caches_the_base(stage_inputs):
    root, ft_cfg = stage_inputs
    cfg = EvaluateSpec(batch_size=4, max_new_tokens=12, latency_requests=2)
    first = run(cfg, _io(root, ft_cfg, "eval1"))
    m = first.metrics
    assert m["candidate"]["n"] == m["base"]["n"] == 10 and m["base_cached"] is False
    # a random 2-layer model writes no valid triage JSON; the metrics say so rather than crash
    for side in ("candidate", "base"):
        assert 0 <= m[side]["json_valid_rate"] <= 1 and m[side]["perplexity"] > 1
        assert m[side]["latency_p95_ms"] >= m[side]["latency_p50_ms"] > 0
        assert m[side]["generated_tokens_per_s"] > 0
    assert set(m["slices"]["candidate"]["channel"]) == {"email", "chat"}
    lines = (root / "eval1" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 10 and {"ticket_id", "gold", "candidate", "base", "exact_match"} <= set(json.loads(lines[0]))
    rows = (root / "eval1" / "confusion_intent.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 11
    assert "| exact_match |" in first.summary and "Intent confusion" in first.summary

    second = run(cfg, _io(root, ft_cfg, "eval2"))
    assert second.metrics["base_cached"] is True
    assert second.metrics["base"] == m["base"] and second.metrics["candidate"]["exact_match"] == \
        m["candidate"]["exact_match"]  # greedy: deterministic


def test_stage_without_an_adapter_fails_clearly(stage_inputs, tmp_path):
    root, ft_cfg = stage_inputs
    (tmp_path / "prepare").symlink_to(root / "prepare")
    (tmp_path / "finetune").mkdir()
    with pytest.raises(StageError, match="no adapter_model.safetensors"):
        run(EvaluateSpec(), _io(tmp_path, ft_cfg, "out"))
