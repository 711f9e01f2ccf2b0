"""register: versions in a real MLflow registry (SQLite store), with alias, tags and a
model card, whose artifacts load back into the same model."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch

from components.base import StageError, file_sha256
from components.reports import EvaluationReport
from components.task import TaskSpec
from tests.components.conftest import ARTICLE_IDS
from tests.conftest import register_run, sqlite_registry


@pytest.fixture(scope="module")
def registered(tiny_run, tmp_path_factory):
    """The tiny run's adapter, registered twice in a fresh SQLite registry."""
    work = tmp_path_factory.mktemp("register")
    with sqlite_registry(work):
        yield _register_twice(tiny_run, work)


def _register_twice(tiny_run, work):
    root = tiny_run["root"]
    results = []
    for i in (1, 2):
        results.append(register_run(tiny_run, work / f"register{i}", "triage-test",
                                    context={"git_commit": f"abc{i}", "spec_sha256": "f" * 64}))
    return {"root": root, "work": work, "results": results, "eval": EvaluationReport.read(root / "evaluate"),
            "splits": tiny_run["splits"], "tiny": tiny_run["tiny"], "finetune": tiny_run["finetune"]}


def test_versions_alias_and_tags(registered):
    client = mlflow.MlflowClient()
    versions = sorted(int(v.version) for v in client.search_model_versions("name='triage-test'"))
    assert versions == [1, 2]
    assert [r.report.version for r in registered["results"]] == [1, 2]
    newest = client.get_model_version_by_alias("triage-test", "challenger")
    assert int(newest.version) == 2  # the alias moved to the newest
    tags = newest.tags
    assert tags["git_commit"] == "abc2" and tags["spec_sha256"] == "f" * 64
    for split, m in registered["splits"].items():
        assert tags[f"data_sha256.{split}"] == m["sha256"]
    assert float(tags["metric.exact_match"]) == registered["eval"].candidate.exact_match
    assert float(tags["metric.intent_accuracy"]) == registered["eval"].candidate.field_accuracy["intent"]
    assert float(tags["metric.base_exact_match"]) == registered["eval"].base.exact_match
    assert len(tags["base_model_sha256"]) == 64


def test_version_artifacts_load_back_into_the_same_model(registered):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = mlflow.artifacts.download_artifacts("models:/triage-test@challenger",
                                                 dst_path=str(registered["work"] / "download"))
    manifest = json.loads(open(f"{folder}/llmops-model.json").read())
    assert manifest["adapter_sha256"] == file_sha256(registered["root"] / "finetune" / "adapter" /
                                                     "adapter_model.safetensors")
    assert manifest["prompt"]["system_prompt"] == TaskSpec().system_prompt
    # the answer schema serving checks answers against, with the data's article ids
    assert manifest["answer_schema"]["schema"]["properties"]["article_id"]["enum"] == ARTICLE_IDS
    assert manifest["answer_schema"]["ordered"] == {"priority": ["low", "medium", "high", "urgent"]}
    card = open(f"{folder}/README.md").read()
    for heading in ("## Training data", "## Evaluation", "## Usage", "## Limitations and biases", "## Licence"):
        assert heading in card
    assert registered["splits"]["test"]["sha256"] in card
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(registered["tiny"]), f"{folder}/adapter")
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(registered["tiny"]),
                                         registered["root"] / "finetune" / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)


def test_stale_evaluation_is_refused(registered, tmp_path):
    registered["eval"].model_copy(update={"test_sha256": "0" * 64}).write(tmp_path / "evaluate")
    with pytest.raises(StageError, match="different test split"):
        register_run(registered, tmp_path / "out", "triage-test", {"evaluate": tmp_path / "evaluate"})
    assert len(mlflow.MlflowClient().search_model_versions("name='triage-test'")) == 2  # nothing registered
