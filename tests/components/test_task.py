"""The task is declared in the spec: a second task, with other answer fields and labels,
defined only in a test spec, runs through prepare -> finetune -> evaluate on a tiny model
with no code change."""
from __future__ import annotations

import copy
import json

import pytest

from components.base import StageIO
from components.evaluate import EvaluateSpec
from components.evaluate import run as evaluate
from components.finetune import FinetuneSpec
from components.finetune import run as finetune
from components.reports import EvaluationReport
from components.splits import read_examples
from components.task import AnswerSchema
from llmops.spec import load_spec
from tests.conftest import REPO, build_features_and_prepare

TEAMS = {"billing_refund": "billing", "account_cancellation": "billing", "login_problem": "accounts"}
SECOND_TASK = ("task={system_prompt: 'Route the ticket. Answer in JSON.', "
               "user_template: '{subject} // {body} // plan {plan}', "
               "answer: {team: {values: [billing, accounts, engineering]}, "
               "escalate: {values: ['no', 'yes'], ordered: true}}, retrieval_query: [body]}")
# The shipped gates name the demo's fields; a task with other fields brings gates of its own.
SECOND_GATES = ("gates.checks={accuracy: {kind: absolute, metric: team_accuracy, min: 0.5}, "
                "no_escalation_drift: {kind: invariance, field: escalate, perturbations: [casing]}}")


@pytest.fixture(scope="module")
def second_task(tmp_path_factory, demo_small):
    """The demo data with the second task's labels, prepared, fine-tuned and evaluated."""
    spec = load_spec(REPO / "pipelines.yaml", overrides=[SECOND_TASK, SECOND_GATES], env={})
    _, pipe = spec.pipeline(None)
    data = copy.deepcopy(demo_small)
    data.tickets = data.tickets.assign(team=data.tickets.intent.map(TEAMS).fillna("engineering"),
                                       escalate=data.tickets.priority.isin(["high", "urgent"]).map(
                                           {True: "yes", False: "no"}))
    root = tmp_path_factory.mktemp("second-task")
    _, prepared, io = build_features_and_prepare(root, data, task=pipe.task)
    return root, pipe, prepared


def test_prepare_writes_the_second_tasks_chats_and_schema(second_task, demo_small):
    root, pipe, prepared = second_task
    example = read_examples(root / "prepare" / "train.jsonl")[0]
    assert example["messages"][0]["content"] == "Route the ticket. Answer in JSON."
    assert " // plan " in example["messages"][1]["content"]
    assert list(json.loads(example["messages"][2]["content"])) == ["team", "escalate"]
    assert example["retrieved"] == []  # no {articles} in the template: no retrieval
    assert prepared.report.retrieval_top_k is None
    schema = AnswerSchema.read(root / "prepare" / AnswerSchema.FILE)
    assert schema.fields == ["team", "escalate"] and schema.ordered == {"escalate": ["no", "yes"]}
    assert schema.parse('{"team": "billing", "escalate": "no"}') == {"team": "billing", "escalate": "no"}
    assert schema.parse('{"intent": "billing_refund", "priority": "low", "article_id": "KB-101"}') is None


def test_finetune_and_evaluate_the_second_task(second_task, tiny):
    root, pipe, _ = second_task
    ft_cfg = FinetuneSpec(base_model=str(tiny), max_steps=2, batch_size=2, eval_every=2, eval_examples=4)
    common = dict(pipeline="t", state_dir=root / "state", sections={"finetune": ft_cfg, "task": pipe.task})
    (root / "finetune").mkdir()
    trained = finetune(ft_cfg, StageIO(out_dir=root / "finetune", inputs={"prepare": root / "prepare"}, **common))
    assert trained.report.steps == 2
    (root / "evaluate").mkdir()
    result = evaluate(EvaluateSpec(max_examples=6, batch_size=3, max_new_tokens=8, latency_requests=1),
                      StageIO(out_dir=root / "evaluate", inputs={"prepare": root / "prepare",
                                                                 "finetune": root / "finetune"}, **common))
    report = result.report
    assert isinstance(report, EvaluationReport)
    assert set(report.candidate.field_accuracy) == {"team", "escalate"} == set(report.base.field_accuracy)
    assert report.candidate.n == 6 and 0 <= report.candidate.exact_match <= 1
    assert "team_accuracy" in report.candidate.flat() and "intent_accuracy" not in report.candidate.flat()
    golds = [json.loads(line)["gold"] for line in (root / "evaluate" / "predictions.jsonl").read_text().splitlines()]
    assert all(set(g) == {"team", "escalate"} for g in golds)
    assert "team confusion" in result.summary
