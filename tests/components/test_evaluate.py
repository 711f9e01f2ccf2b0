"""evaluate: answer parsing on good and malformed outputs, the metrics on constructed
answers, and the stage on a tiny model (candidate and base, the base result cached)."""
from __future__ import annotations

import json

import pytest

from components.base import StageError, StageIO
from components.evaluate import EvaluateSpec, by_phrasing, render, run
from components.finetune import FinetuneSpec
from components.finetune import fit as train
from components.reports import EvaluationReport, ModelMetrics
from components.stats import interval_text, wilson
from components.task import INVALID, AnswerSchema, TaskSpec, cannot_be_answer
from tests.components.conftest import ARTICLE_IDS, chat_examples, write_prepared

GOLD = {"intent": "billing_refund", "priority": "high", "article_id": "KB-101"}
SCHEMA = AnswerSchema.of(TaskSpec(), {"article_id": ARTICLE_IDS})


@pytest.mark.parametrize(("text", "parsed"), [
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-101"}', GOLD),
    ('  {"article_id": "KB-101", "intent": "billing_refund", "priority": "high"}\n', GOLD),  # order, whitespace
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-101"} thanks!', None),  # trailing text
    ('{"intent": "billing_refund", "priority": "high"}', None),  # missing key
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-101", "x": 1}', None),  # extra key
    ('{"intent": "billing_refund", "priority": 2, "article_id": "KB-101"}', None),  # not a string
    ('{"intent": "complaint", "priority": "high", "article_id": "KB-101"}', None),  # not an allowed intent
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-999"}', None),  # not an article
    ('{"intent": "billing_refund", "priority": "high", "article_id": "KB-1', None),  # cut off
    ('["billing_refund", "high", "KB-101"]', None),  # not an object
    ('```json\n{"intent": "billing_refund", "priority": "high", "article_id": "KB-101"}\n```', None),  # fenced
    ("", None),
    ("[" * 5000, None),  # deep nesting must not crash the parser
])
def test_answers_are_parsed_against_the_schema(text, parsed):
    assert SCHEMA.parse(text) == parsed
    assert (SCHEMA.errors(text) == []) == (parsed is not None)


def test_schema_derived_from_the_task():
    schema = SCHEMA.schema
    assert schema["required"] == ["intent", "priority", "article_id"] and schema["additionalProperties"] is False
    assert schema["properties"]["priority"]["enum"] == ["low", "medium", "high", "urgent"]
    assert schema["properties"]["article_id"]["enum"] == ARTICLE_IDS
    assert SCHEMA.rank("priority", "high") > SCHEMA.rank("priority", "low")
    # without the data, a table-bound field is any string
    assert AnswerSchema.of(TaskSpec()).schema["properties"]["article_id"] == {"type": "string"}


def test_score_counts_each_field_and_exact_match():
    golds = [GOLD, GOLD, {**GOLD, "intent": "bug_report"}, GOLD]
    answers = [json.dumps(GOLD),                                   # all right
               json.dumps({**GOLD, "priority": "low"}),             # priority wrong
               json.dumps(GOLD),                                    # intent wrong
               "I think it is a billing issue"]                     # invalid
    assert SCHEMA.score(golds, answers) == {"n": 4, "json_valid_rate": 0.75, "intent_accuracy": 0.5,
                                            "priority_accuracy": 0.5, "article_id_accuracy": 0.75,
                                            "exact_match": 0.25}
    with pytest.raises(ValueError, match="4 gold labels but 3 answers"):
        SCHEMA.score(golds, answers[:3])


def test_slices_and_confusion():
    golds = [GOLD, GOLD, {**GOLD, "intent": "bug_report"}]
    answers = [json.dumps(GOLD), "nope", json.dumps(GOLD)]
    metas = [{"channel": "email", "plan": "pro"}, {"channel": "email", "plan": "free"}, {"channel": "chat"}]
    slices = SCHEMA.slices(metas, golds, answers, ["channel", "plan"])
    # each slice's exact match with its 95% Wilson interval: 0 of 1 -> [0, z^2 / (1 + z^2)] = [0, 0.7935]
    assert slices["channel"] == {"chat": {"n": 1, "exact_match": 0.0, "exact_match_ci": [0.0, 0.7935]},
                                 "email": {"n": 2, "exact_match": 0.5, "exact_match_ci": [0.0945, 0.9055]}}
    assert slices["plan"]["None"] == {"n": 1, "exact_match": 0.0, "exact_match_ci": [0.0, 0.7935]}
    assert SCHEMA.confusion(golds, answers, "intent") == {("billing_refund", "billing_refund"): 1,
                                                          ("billing_refund", INVALID): 1,
                                                          ("bug_report", "billing_refund"): 1}


@pytest.mark.parametrize(("text", "dead"), [
    ("", False), ("  ", False), ("{", False), ('{"intent": "a}b', False), ('{"a": "x"}', False),
    ('{"a": "x"}\n', False), ("Sure", True), (" The ticket", True), ('{"a": "x"} and', True), ('{"a": 1}}', True),
    ('{"a": "\\"}"}', False),  # an escaped quote inside a string does not end it
])
def test_generation_stops_only_text_that_can_no_longer_be_an_answer(text, dead):
    assert cannot_be_answer(text) is dead
    if dead:  # whatever follows, the answer is invalid: stopping early changes no score
        for tail in ("", "}", ' {"intent": "billing_refund"}'):
            assert SCHEMA.parse(text + tail) is None


@pytest.fixture(scope="module")
def stage_inputs(tiny, tmp_path_factory):
    """prepare's test split and a tiny adapter trained a few steps, as the stage reads them."""
    root = tmp_path_factory.mktemp("evaluate")
    test = chat_examples(10)
    for i, chat in enumerate(test):  # two chats of the held-out phrasing, as prepare writes them
        chat["meta"]["phrasing"] = "unseen" if i % 5 == 0 else "seen"
    write_prepared(root / "prepare", {"test": test})
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
        assert m[side]["generated_tokens_per_s"] > 0
        assert set(m[side]["field_accuracy"]) == {"intent", "priority", "article_id"}
    # 2 requests: a median (p50 needs 2) but no p95 (it needs 20): the slowest of the 2 instead
    c = m["candidate"]
    assert c["latency_requests"] == 2 and c["latency_p95_ms"] is None and c["latency_max_ms"] >= c["latency_p50_ms"] > 0
    assert f"max {c['latency_max_ms']:g} ms (2 requests; p95 needs >= 20)" in first.summary
    assert m["base"]["latency_p50_ms"] is None  # only the candidate is timed one request at a time
    # every rate with its 95% Wilson interval over the 10 chats, in the report and the table
    k = round(c["exact_match"] * 10)
    assert c["exact_match_ci"] == wilson(k, 10) and c["exact_match_ci"][0] <= c["exact_match"] <= c["exact_match_ci"][1]
    assert set(c["field_accuracy_ci"]) == {"intent", "priority", "article_id"}
    assert f"| exact_match | {c['exact_match']} | {interval_text(c['exact_match_ci'])} |" in first.summary
    assert set(m["slices"]["candidate"]["channel"]) == {"email", "chat"}
    lines = (root / "eval1" / "predictions.jsonl").read_text().splitlines()
    # the phrasing slice: its counts, and its exact match as the predictions say
    matched = {row["ticket_id"]: row["exact_match"] for row in map(json.loads, lines)}
    for value, ids in (("seen", [f"T{i}" for i in range(10) if i % 5]), ("unseen", ["T0", "T5"])):
        got = m["slices"]["candidate"]["phrasing"][value]
        assert got["n"] == len(ids) and got["exact_match"] == sum(matched[t] for t in ids) / len(ids)
    assert f"Exact match by phrasing: {by_phrasing(first.report)}." in first.summary
    assert "in-distribution" in first.summary and "(2 chats; base" in first.summary
    assert len(lines) == 10 and {"ticket_id", "gold", "candidate", "base", "exact_match"} <= set(json.loads(lines[0]))
    # rows whose text could no longer become an answer were cut there (at most a couple of
    # tokens), not generated on to max_new_tokens (12)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "finetune" / "adapter")
    dead = [t for row in map(json.loads, lines) for t in (row["candidate"], row["base"]) if cannot_be_answer(t)]
    assert dead and all(len(tokenizer(t, add_special_tokens=False).input_ids) <= 3 for t in dead)
    rows = (root / "eval1" / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 11
    assert "| exact_match |" in first.summary and "intent confusion" in first.summary

    second = run(cfg, _io(root, ft_cfg, "eval2"))
    assert second.metrics["base_cached"] is True
    assert second.metrics["base"] == m["base"] and second.metrics["candidate"]["exact_match"] == \
        m["candidate"]["exact_match"]  # greedy: deterministic


def test_report_puts_in_distribution_beside_unseen_phrasing():
    def model(em: float) -> ModelMetrics:
        return ModelMetrics(n=300, json_valid_rate=1.0, exact_match=em, field_accuracy={"intent": em})

    slices = {"candidate": {"phrasing": {"seen": {"n": 200, "exact_match": 0.9, "exact_match_ci": wilson(180, 200)},
                                         "unseen": {"n": 100, "exact_match": 0.55,
                                                    "exact_match_ci": wilson(55, 100)}}},
              "base": {"phrasing": {"seen": {"n": 200, "exact_match": 0.0}, "unseen": {"n": 100, "exact_match": 0.01}}}}
    report = EvaluationReport(candidate=model(0.7833), base=model(0.0033), base_cached=False, exact_match_gain=0.78,
                              slices=slices, base_model_sha256="a" * 64, test_sha256="b" * 64)
    assert by_phrasing(report) == ("in-distribution 0.900 [0.851, 0.934] (200 chats; base 0.000), "
                                   "unseen phrasing 0.550 [0.452, 0.644] (100 chats; base 0.010)")
    text = render(report, 300, {("billing_refund", "billing_refund"): 3}, "intent")
    assert "Exact match by phrasing: in-distribution 0.900 [0.851, 0.934] (200 chats" in text
    assert "| phrasing=unseen | 100 | 0.55 | [0.452, 0.644] | 0.01 |" in text
    # without a phrasing slice (data of your own), nothing is said about it
    plain = report.model_copy(update={"slices": {"candidate": {}, "base": {}}})
    assert by_phrasing(plain) == "" and "phrasing" not in render(plain, 300, {}, "intent")


def test_stage_without_an_adapter_fails_clearly(stage_inputs, tmp_path):
    root, ft_cfg = stage_inputs
    (tmp_path / "prepare").symlink_to(root / "prepare")
    (tmp_path / "finetune").mkdir()
    with pytest.raises(StageError, match="no adapter_model.safetensors"):
        run(EvaluateSpec(), _io(tmp_path, ft_cfg, "out"))
