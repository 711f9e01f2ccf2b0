"""register: versions in a real MLflow registry (SQLite store), with alias, tags and a
model card, whose artifacts load back into the same model."""
from __future__ import annotations

import json

import mlflow
import pytest
import torch

from components.base import StageError, StageIO, file_sha256, write_json
from components.evaluate import EvaluateSpec
from components.evaluate import run as evaluate
from components.finetune import FinetuneSpec, train
from components.prepare import PrepareSpec
from components.register import RegisterSpec, run
from tests.components.conftest import chat_examples


@pytest.fixture(scope="module")
def registered(tiny, tmp_path_factory):
    """A tiny adapter, evaluated, registered twice in a fresh SQLite registry."""
    root = tmp_path_factory.mktemp("register")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_name="t")
    (root / "prepare").mkdir()
    splits = {}
    for split, offset, n in (("train", 100, 16), ("validation", 200, 4), ("test", 0, 6)):
        path = root / "prepare" / f"{split}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in chat_examples(n, offset)))
        splits[split] = {"examples": n, "sha256": file_sha256(path)}
    write_json(root / "prepare" / "splits.json", splits)
    ft_cfg = FinetuneSpec(base_model=str(tiny), max_steps=3, batch_size=4, warmup_steps=1, eval_every=3,
                          eval_examples=4, seed=1)
    metrics = train(ft_cfg, str(tiny), chat_examples(16, 100), chat_examples(4, 200), root / "finetune",
                    root / "ckpt", progress=False)
    write_json(root / "finetune" / "metrics.json", metrics)
    (root / "evaluate").mkdir()
    ev = evaluate(EvaluateSpec(batch_size=3, max_new_tokens=8, latency_requests=1),
                  StageIO(pipeline="t", out_dir=root / "evaluate", inputs={"prepare": root / "prepare",
                                                                            "finetune": root / "finetune"},
                          state_dir=root / "state", sections={"finetune": ft_cfg}))
    write_json(root / "evaluate" / "metrics.json", ev.metrics)
    results = []
    for i in (1, 2):
        out = root / f"register{i}"
        out.mkdir()
        io = StageIO(pipeline="t", out_dir=out, state_dir=root / "state",
                     inputs={s: root / s for s in ("prepare", "finetune", "evaluate")},
                     sections={"finetune": ft_cfg, "prepare": PrepareSpec()},
                     context={"git_commit": f"abc{i}", "spec_sha256": "f" * 64})
        results.append(run(RegisterSpec(model_name="triage-test"), io))
    yield {"root": root, "results": results, "eval": ev.metrics, "splits": splits, "tiny": tiny}
    mlflow.set_tracking_uri(previous)


def test_versions_alias_and_tags(registered):
    client = mlflow.MlflowClient()
    versions = sorted(int(v.version) for v in client.search_model_versions("name='triage-test'"))
    assert versions == [1, 2]
    assert [r.metrics["version"] for r in registered["results"]] == [1, 2]
    newest = client.get_model_version_by_alias("triage-test", "challenger")
    assert int(newest.version) == 2  # the alias moved to the newest
    tags = newest.tags
    assert tags["git_commit"] == "abc2" and tags["spec_sha256"] == "f" * 64
    for split, m in registered["splits"].items():
        assert tags[f"data_sha256.{split}"] == m["sha256"]
    assert float(tags["metric.exact_match"]) == registered["eval"]["candidate"]["exact_match"]
    assert float(tags["metric.base_exact_match"]) == registered["eval"]["base"]["exact_match"]
    assert len(tags["base_model_sha256"]) == 64


def test_version_artifacts_load_back_into_the_same_model(registered):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = mlflow.artifacts.download_artifacts("models:/triage-test@challenger",
                                                 dst_path=str(registered["root"] / "download"))
    manifest = json.loads(open(f"{folder}/llmops-model.json").read())
    assert manifest["adapter_sha256"] == file_sha256(registered["root"] / "finetune" / "adapter" /
                                                     "adapter_model.safetensors")
    assert manifest["prompt"]["system_prompt"] == PrepareSpec().system_prompt
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
    root = registered["root"]
    metrics = json.loads((root / "evaluate" / "metrics.json").read_text())
    (tmp_path / "evaluate").mkdir()
    write_json(tmp_path / "evaluate" / "metrics.json", {**metrics, "test_sha256": "0" * 64})
    io = StageIO(pipeline="t", out_dir=tmp_path / "out", state_dir=root / "state",
                 inputs={"prepare": root / "prepare", "finetune": root / "finetune", "evaluate": tmp_path / "evaluate"},
                 sections={"finetune": FinetuneSpec(base_model=str(registered["tiny"]))})
    with pytest.raises(StageError, match="different test split"):
        run(RegisterSpec(model_name="triage-test"), io)
    assert len(mlflow.MlflowClient().search_model_versions("name='triage-test'")) == 2  # nothing registered
