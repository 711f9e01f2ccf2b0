"""compress: every variant built from a tiny fine-tuned model, loaded and generating; ONNX
against PyTorch; quantization error within bounds; the distillation loss by hand; the
selection on constructed reports; the chosen variant in the registered version."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from components.base import StageError, StageIO, file_sha256, write_json
from components.compress import (VARIANTS, BudgetSpec, CompressSpec, DistilledSpec, WeightOnlySpec, MeasureSpec,
                                 PrunedSpec, StudentSpec, build_order, distillation_loss, jaccard, load_variant,
                                 run, select)
from components.evaluate import EvaluateSpec, generate, prompt_ids
from components.evaluate import run as evaluate
from components.finetune import FinetuneSpec, train
from components.prepare import PrepareSpec
from components.register import RegisterSpec
from components.register import run as register
from tests.components.conftest import chat_examples


# ---------------------------------------------------------------- pure parts

def test_distillation_loss_equals_the_hand_computed_value():
    student = [[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]]
    teacher = [[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]]
    target = [0, 2]
    t, alpha = 2.0, 0.3

    def softmax(xs, temp=1.0):
        e = [math.exp(x / temp) for x in xs]
        return [v / sum(e) for v in e]

    kl = sum(sum(p * math.log(p / q) for p, q in zip(softmax(tr, t), softmax(sr, t)))
             for sr, tr in zip(student, teacher)) / 2
    ce = sum(-math.log(softmax(sr)[y]) for sr, y in zip(student, target)) / 2
    expected = alpha * t * t * kl + (1 - alpha) * ce
    loss, kl_t, ce_t = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(target), t, alpha)
    assert kl_t.item() == pytest.approx(kl, rel=1e-6)
    assert ce_t.item() == pytest.approx(ce, rel=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    same, kl0, _ = distillation_loss(torch.tensor(teacher), torch.tensor(teacher), torch.tensor(target), t, 1.0)
    assert kl0.item() == pytest.approx(0.0, abs=1e-7) and same.item() == pytest.approx(0.0, abs=1e-6)


def test_jaccard_of_top_k_sets():
    a = [[[1, 2, 3], [4, 5, 6]]]
    b = [[[1, 3, 9], [7, 5, 4]]]
    assert jaccard(a, b, 1) == 0.5  # position 1 agrees, position 2 does not
    assert jaccard(a, b, 3) == round(((2 / 4) + (2 / 4)) / 2, 4)
    assert jaccard(a, a, 3) == 1.0


def test_build_order_adds_parents_and_the_reference():
    assert build_order(["int4_weight"]) == ["merged", "onnx", "int4_weight"]
    assert build_order(["distilled", "int8_dynamic"]) == ["merged", "onnx", "int8_dynamic", "distilled"]
    assert build_order([]) == ["merged"]


def _variant(size, tps, em, j1=0.99, ppl=1.02):
    return {"size_mb": size, "tokens_per_s_batch1": tps, "exact_match": em, "jaccard_at_1": j1, "perplexity": ppl}


REPORT = {"merged": _variant(538, 20, 0.90, 1.0, 1.01), "onnx": _variant(539, 32, 0.90, 1.0, 1.01),
          "int8_dynamic": _variant(212, 47, 0.89), "int4_weight": _variant(173, 39, 0.895),
          "pruned": _variant(538, 20, 0.70, 0.85, 1.5)}


def test_select_fastest_and_smallest_within_budget():
    chosen, why, broke = select(REPORT, BudgetSpec(exact_match_drop=0.01), "fastest")
    assert chosen == "int8_dynamic"  # a drop of exactly 1 point is within a 1-point budget
    assert "2.35x the tokens/s" in why and "pruned: exact match -20.0 pts" in why
    assert broke["pruned"] == ["exact match -20.0 pts (budget -1.0)", "Jaccard@1 0.850 < 0.9"]
    assert broke["int4_weight"] == [] and broke["onnx"] == []
    chosen, why, _ = select(REPORT, BudgetSpec(exact_match_drop=0.01), "smallest")
    assert chosen == "int4_weight" and "173 MB" in why
    chosen, _, broke = select(REPORT, BudgetSpec(exact_match_drop=0.005), "fastest")
    assert chosen == "int4_weight" and broke["int8_dynamic"] == ["exact match -1.0 pts (budget -0.5)"]


def test_select_falls_back_to_merged_and_names_every_broken_budget():
    report = {**REPORT, "int8_dynamic": _variant(212, 47, 0.89, j1=0.8), "int4_weight": _variant(173, 39, 0.80),
              "onnx": _variant(539, 32, 0.90, 1.0, 1.2)}
    chosen, why, broke = select(report, BudgetSpec(exact_match_drop=0.01, max_perplexity_ratio=1.1), "fastest")
    assert chosen == "merged"
    assert why.startswith("no variant is within the budget, so the uncompressed merged model")
    assert broke["int8_dynamic"] == ["Jaccard@1 0.800 < 0.9"]
    assert broke["int4_weight"][0] == "exact match -10.0 pts (budget -1.0)"
    assert broke["onnx"] == ["perplexity x1.188 > x1.1"]
    assert all(name in why for name in ("int8_dynamic", "int4_weight", "onnx", "pruned"))
    with pytest.raises(StageError, match="reference"):
        select({"onnx": REPORT["onnx"]}, BudgetSpec(), "fastest")


def test_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="power of two"):
        WeightOnlySpec(block_size=48)
    with pytest.raises(ValueError, match="exactly one"):
        StudentSpec(layers=4, model="x")
    with pytest.raises(ValueError):
        CompressSpec(variants=["int3"])
    assert CompressSpec().variants == list(VARIANTS)


# ---------------------------------------------------------------- the stage on a tiny model

@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    """A tiny adapter trained a few steps, compressed into every variant (all kept)."""
    root = tmp_path_factory.mktemp("compress")
    (root / "prepare").mkdir()
    for split, offset, n in (("train", 100, 16), ("validation", 200, 6), ("test", 0, 6)):
        (root / "prepare" / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n"
                                                                 for e in chat_examples(n, offset)))
    ft_cfg = FinetuneSpec(base_model=str(tiny), max_steps=4, batch_size=4, learning_rate=5e-3, warmup_steps=1,
                          eval_every=4, eval_examples=4, seed=1)
    train(ft_cfg, str(tiny), chat_examples(16, offset=100), chat_examples(4, offset=200), root / "finetune",
          root / "ckpt", progress=False)
    cfg = CompressSpec(keep_variants=True, budget=BudgetSpec(exact_match_drop=0.01, min_jaccard_at_1=0.5),
                       measure=MeasureSpec(max_new_tokens=8, latency_requests=2, forward_repeats=2, batch_size=3),
                       pruned=PrunedSpec(method="structured", sparsity=0.2),
                       distilled=DistilledSpec(student=StudentSpec(layers=1), max_steps=3, batch_size=4,
                                               learning_rate=1e-3, warmup_steps=1))
    (root / "compress").mkdir()
    io = StageIO(pipeline="t", out_dir=root / "compress", state_dir=root / "state",
                 inputs={"prepare": root / "prepare", "finetune": root / "finetune"}, sections={"finetune": ft_cfg})
    result = run(cfg, io)
    write_json(root / "compress" / "metrics.json", result.metrics)
    return {"root": root, "result": result, "ft_cfg": ft_cfg, "tiny": tiny}


def _logits(folder, text_ids):
    _, model = load_variant(folder)
    with torch.no_grad():
        ids = torch.tensor([text_ids])
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()


def test_every_variant_is_built_measured_and_generates(compressed):
    m = compressed["result"].metrics
    variants = compressed["root"] / "compress" / "variants"
    assert set(m["variants"]) == set(VARIANTS)
    example = chat_examples(1, 200)[0]
    for name, v in m["variants"].items():
        assert v["size_mb"] > 0 and v["load_s"] > 0 and v["forward_p50_ms"] > 0
        assert v["tokens_per_s_batch1"] > 0 and v["tokens_per_s_batch8"] > 0
        assert v["request_latency_p95_ms"] >= v["request_latency_p50_ms"] > 0
        assert 0 <= v["exact_match"] <= 1 and v["perplexity"] > 1
        assert 0 <= v["jaccard_at_10"] <= 1
        tokenizer, model = load_variant(variants / name)
        answers, generated, _ = generate(model, tokenizer, [prompt_ids(example, tokenizer)], 1, 6)
        assert generated > 0 and isinstance(answers[0], str), name
    ref = m["variants"]["merged"]
    assert ref["jaccard_at_1"] == 1.0 and ref["vs_reference"]["exact_match_change"] == 0
    assert m["variants"]["int8_dynamic"]["parent"] == "onnx"
    assert set(m["variants"]["int8_dynamic"]["vs_parent"]) >= {"exact_match_change", "size_ratio", "speedup_batch1"}


def test_onnx_matches_pytorch_and_quantized_variants_stay_close(compressed):
    variants = compressed["root"] / "compress" / "variants"
    ids = list(range(5, 60))
    reference = _logits(variants / "merged", ids)
    onnx = _logits(variants / "onnx", ids)
    assert torch.allclose(onnx, reference, atol=1e-4), (onnx - reference).abs().max()
    scale = reference.std().item()
    for name, bound in (("int8_dynamic", 0.15), ("int8_static", 0.3), ("int8_weight", 0.05), ("int4_weight", 0.3)):
        quantized = _logits(variants / name, ids)
        error = (quantized - reference).abs().mean().item() / scale
        assert 0 < error < bound, (name, error)  # really quantized, and not wrecked
    import onnx
    from collections import Counter

    weights, ops = {}, {}
    for name in ("onnx", "int8_dynamic", "int8_static", "int8_weight", "int4_weight"):
        graph = onnx.load(variants / name / "model.onnx").graph
        weights[name] = sum(t.ByteSize() for t in graph.initializer)
        ops[name] = Counter(n.op_type for n in graph.node)
    # all 14 weight MatMuls of the 2 blocks (q k v o gate up down) are quantized; the output head is not
    assert ops["onnx"]["MatMul"] == 20 and ops["int8_dynamic"]["MatMulInteger"] == 14
    assert ops["int8_static"]["QuantizeLinear"] > 0
    # weight-only: the blocks plus the output head (untied from the embedding), the embedding in 4 bits
    for name in ("int8_weight", "int4_weight"):
        assert ops[name]["MatMulNBits"] == 15 and ops[name]["GatherBlockQuantized"] == 1 and ops[name]["MatMul"] == 5
    # the tiny model is mostly its fp32 embedding (kept by int8_dynamic): compare bytes, not the rounded MB
    assert weights["int4_weight"] < weights["int8_weight"] < weights["int8_dynamic"] < weights["onnx"]


def test_pruned_and_distilled_report_what_they_did(compressed):
    m = compressed["result"].metrics["variants"]
    pruned = m["pruned"]["details"]
    assert pruned["method"] == "structured" and abs(pruned["achieved_sparsity"] - 0.2) < 0.02
    variants = compressed["root"] / "compress" / "variants"
    config = json.loads((variants / "pruned" / "config.json").read_text())
    assert config["intermediate_size"] < 64
    assert (variants / "pruned" / "model.safetensors").stat().st_size < \
        (variants / "merged" / "model.safetensors").stat().st_size
    distilled = m["distilled"]["details"]
    assert distilled["student_layers"] == 1 and distilled["steps"] == 3
    assert math.isfinite(distilled["final_loss"]) and distilled["trained_params"] < distilled["student_params"]
    from safetensors.torch import load_file

    student, teacher = (load_file(variants / n / "model.safetensors") for n in ("distilled", "merged"))
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])  # kept
    assert not torch.equal(student["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"])


def test_magnitude_pruning_reaches_the_declared_sparsity(compressed, tmp_path):
    from components.compress import prune

    details = prune(compressed["root"] / "compress" / "variants" / "merged", tmp_path, PrunedSpec(sparsity=0.3))
    assert details["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)


def test_chosen_variant_outputs_and_report(compressed):
    out = compressed["root"] / "compress"
    m = compressed["result"].metrics
    assert m["chosen"] in VARIANTS and m["reason"]
    info = json.loads((out / "model" / "variant.json").read_text())
    assert info["name"] == m["chosen"]
    for name, v in m["variants"].items():
        assert v["within_budget"] == (not v["budget_broken"])
    report = (out / "report.md").read_text()
    assert "| int4_weight |" in report or "| int4_weight (chosen) |" in report
    assert "Against the parent" in report and f"Chosen: {m['chosen']}" in report
    rows = (out / "quality_speed.csv").read_text().splitlines()
    assert rows[0].startswith("variant,tokens_per_s_batch1,exact_match") and len(rows) == 1 + len(VARIANTS)
    assert (out / "quality_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_registered_version_holds_the_chosen_variant(compressed):
    root, ft_cfg = compressed["root"], compressed["ft_cfg"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_experiment(experiment_name="compress")  # not the experiment id another test's store left active
    try:
        splits = {s: {"examples": 6, "sha256": file_sha256(root / "prepare" / f"{s}.jsonl")}
                  for s in ("train", "validation", "test")}
        write_json(root / "prepare" / "splits.json", splits)
        (root / "evaluate").mkdir()
        ev = evaluate(EvaluateSpec(batch_size=3, max_new_tokens=6, latency_requests=1),
                      StageIO(pipeline="t", out_dir=root / "evaluate", state_dir=root / "state",
                              inputs={"prepare": root / "prepare", "finetune": root / "finetune"},
                              sections={"finetune": ft_cfg}))
        write_json(root / "evaluate" / "metrics.json", ev.metrics)
        write_json(root / "finetune" / "metrics.json", {"total_params": 1})
        (root / "register").mkdir()
        result = register(RegisterSpec(model_name="triage-compressed"), StageIO(
            pipeline="t", out_dir=root / "register", state_dir=root / "state",
            inputs={s: root / s for s in ("prepare", "finetune", "evaluate", "compress")},
            sections={"finetune": ft_cfg, "prepare": PrepareSpec()}))
        folder = mlflow.artifacts.download_artifacts("models:/triage-compressed@challenger",
                                                     dst_path=str(root / "download"))
        manifest = json.loads(open(f"{folder}/llmops-model.json").read())
        chosen = compressed["result"].metrics["chosen"]
        assert manifest["serving"]["variant"] == chosen
        for name, digest in manifest["serving"]["files_sha256"].items():
            assert file_sha256(Path(folder) / "serving" / name) == digest
        assert "## Serving variant" in open(f"{folder}/README.md").read()
        version = mlflow.MlflowClient().get_model_version("triage-compressed", result.metrics["version"])
        assert version.tags["serving_variant"] == chosen
        ids = list(range(5, 40))
        assert torch.equal(_logits(Path(folder) / "serving", ids),
                           _logits(root / "compress" / "model", ids))
    finally:
        mlflow.set_tracking_uri(previous)


def test_unmergeable_adapter_is_refused(tiny, tmp_path):
    from components.compress import build_merged

    cfg = FinetuneSpec(base_model=str(tiny), method={"kind": "prompt_tuning", "num_virtual_tokens": 4}, max_steps=1,
                       batch_size=2, warmup_steps=0, eval_every=1, eval_examples=2)
    train(cfg, str(tiny), chat_examples(4, 100), chat_examples(2, 200), tmp_path / "ft", tmp_path / "ck",
          progress=False)
    with pytest.raises(StageError, match="cannot be merged"):
        build_merged(str(tiny), tmp_path / "ft" / "adapter", tmp_path / "merged")
