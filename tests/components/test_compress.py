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

from components.base import StageError, StageIO, file_sha256
from components.compress import CompressSpec, run
from components.compress.distill import DistilledSpec, StudentSpec, distillation_loss
from components.compress.measure import MeasureSpec
from components.compress.report import BudgetSpec, select
from components.compress.variants import (VARIANTS, BuildContext, Merged, Pruned, PrunedSpec, WeightOnlySpec,
                                          build_order)
from components.lm import generate, load, prompt_ids
from components.measure import jaccard
from components.reports import CompressReport, ModelMetrics, VariantReport
from tests.components.conftest import assert_fast_tokenizer, chat_examples
from tests.conftest import register_run, sqlite_registry


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


def _variant(size, tps, em, j1=0.99, ppl=1.02) -> VariantReport:
    return VariantReport(parent=None, format="onnx", build_s=1, size_mib=size, load_s=1, forward_p50_ms=1,
                         tokens_per_s_batch1=tps, tokens_per_s_batched=tps, request_latency_p50_ms=1,
                         request_latency_p95_ms=1, jaccard_at={1: j1},
                         quality=ModelMetrics(n=100, json_valid_rate=1, exact_match=em, field_accuracy={},
                                              perplexity=ppl))


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
    assert chosen == "int4_weight" and "173.0 MiB" in why
    chosen, _, broke = select(REPORT, BudgetSpec(exact_match_drop=0.005), "fastest")
    assert chosen == "int4_weight" and broke["int8_dynamic"] == ["exact match -1.0 pts (budget -0.5)"]


def test_a_small_variant_slower_than_merged_is_not_chosen():
    # int8_weight with fp32 activations (accuracy_level 0) on an AVX2-only CPU: a third of
    # the size, a fifth of the speed
    report = {"merged": _variant(513.2, 11.6, 0.66, 1.0), "int8_weight": _variant(162.5, 2.2, 0.65),
              "int8_dynamic": _variant(300.0, 15.1, 0.66)}
    chosen, _, broke = select(report, BudgetSpec(), "smallest")
    assert chosen == "int8_dynamic" and broke["int8_weight"] == ["0.19x the tokens/s at batch 1 < 1.0x"]
    chosen, _, broke = select(report, BudgetSpec(min_speedup_batch1=1.5), "smallest")
    assert chosen == "merged" and broke["int8_dynamic"] == ["1.30x the tokens/s at batch 1 < 1.5x"]
    assert select(report, BudgetSpec(min_speedup_batch1=None), "smallest")[0] == "int8_weight"


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
    # the default builds only what can win; every variant stays one override away
    assert CompressSpec().variants == ["int8_weight"]
    assert CompressSpec(variants=list(VARIANTS)).variants == list(VARIANTS)


# ---------------------------------------------------------------- the stage on a tiny model

def _compress(root: Path, tiny_run: dict, cfg: CompressSpec) -> dict:
    out = root / "compress"
    out.mkdir(parents=True)
    src = tiny_run["root"]
    io = StageIO(pipeline="t", out_dir=out, state_dir=root / "state",
                 inputs={"prepare": src / "prepare", "finetune": src / "finetune"},
                 sections={"finetune": tiny_run["finetune"]})
    result = run(cfg, io)
    result.report.write(out)
    return {"root": root, "out": out, "result": result, "report": result.report}


@pytest.fixture(scope="module")
def compressed(tiny_run, tmp_path_factory):
    """The tiny run's adapter compressed into every variant (all kept)."""
    cfg = CompressSpec(variants=list(VARIANTS), keep_variants=True,
                       budget=BudgetSpec(exact_match_drop=0.01, min_jaccard_at_1=0.5),
                       measure=MeasureSpec(max_new_tokens=8, latency_requests=2, forward_repeats=2, batch_size=3),
                       pruned=PrunedSpec(method="structured", sparsity=0.2),
                       distilled=DistilledSpec(student=StudentSpec(layers=1), max_steps=3, batch_size=4,
                                               learning_rate=1e-3, warmup_steps=1))
    return _compress(tmp_path_factory.mktemp("compress"), tiny_run, cfg) | {"tiny_run": tiny_run}


def _logits(folder, text_ids):
    _, model = load(folder, device=torch.device("cpu"))
    with torch.no_grad():
        ids = torch.tensor([text_ids])
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()


def test_every_variant_is_built_measured_and_generates(compressed):
    report: CompressReport = compressed["report"]
    variants = compressed["out"] / "variants"
    assert set(report.variants) == set(VARIANTS) and report.batch_size == 3 and report.cpu
    example = chat_examples(1, 200)[0]
    for name, v in report.variants.items():
        assert v.size_mib > 0 and v.load_s > 0 and v.forward_p50_ms > 0
        assert v.tokens_per_s_batch1 > 0 and v.tokens_per_s_batched > 0
        # 2 requests: a median, no p95 (it needs 20); the slowest of the 2 is kept instead
        assert v.latency_requests == 2 and v.request_latency_p95_ms is None
        assert v.request_latency_max_ms >= v.request_latency_p50_ms > 0
        assert 0 <= v.quality.exact_match <= 1 and v.quality.perplexity > 1
        assert 0 <= v.jaccard_at[10] <= 1
        assert_fast_tokenizer(variants / name)  # the base model's tokenizer files, carried over
        tokenizer, model = load(variants / name, device=torch.device("cpu"))
        out = generate(model, tokenizer, [prompt_ids(example["messages"][:-1], tokenizer)], 1, 6)
        assert out.tokens > 0 and isinstance(out.texts[0], str), name
    ref = report.variants["merged"]
    assert ref.jaccard_at[1] == 1.0 and ref.vs_reference["exact_match_change"] == 0
    assert report.variants["int8_dynamic"].parent == "onnx"
    assert set(report.variants["int8_dynamic"].vs_parent) >= {"exact_match_change", "size_ratio", "speedup_batch1"}
    # the report reads back as it was written
    assert CompressReport.read(compressed["out"]) == report


def test_onnx_matches_pytorch_and_quantized_variants_stay_close(compressed):
    variants = compressed["out"] / "variants"
    ids = list(range(5, 60))
    reference = _logits(variants / "merged", ids)
    onnx = _logits(variants / "onnx", ids)
    assert torch.allclose(onnx, reference, atol=1e-4), (onnx - reference).abs().max()
    scale = reference.std().item()
    errors = {}
    for name, bound in (("int8_dynamic", 0.05), ("int8_static", 0.1), ("int8_weight", 0.15), ("int4_weight", 0.3)):
        quantized = _logits(variants / name, ids)
        errors[name] = (quantized - reference).abs().mean().item() / scale
        assert 0 < errors[name] < bound, (name, errors[name])  # really quantized, and not wrecked
    # 8-bit blocks lose less than 4-bit ones (both with the embedding in 4 bits)
    assert errors["int8_weight"] < errors["int4_weight"]
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
    # the tiny model is mostly its fp32 embedding (kept by int8_dynamic): compare bytes, not the rounded MiB
    assert weights["int4_weight"] < weights["int8_weight"] < weights["int8_dynamic"] < weights["onnx"]
    # the int8 (MatMulInteger) variants use 7-bit weights by default: they hold quality without VNNI
    assert compressed["report"].variants["int8_dynamic"].details["reduce_range"] is True


def test_pruned_and_distilled_report_what_they_did(compressed):
    variants_report = compressed["report"].variants
    pruned = variants_report["pruned"].details
    assert pruned["method"] == "structured" and abs(pruned["achieved_sparsity"] - 0.2) < 0.02
    variants = compressed["out"] / "variants"
    config = json.loads((variants / "pruned" / "config.json").read_text())
    assert config["intermediate_size"] < 64
    assert (variants / "pruned" / "model.safetensors").stat().st_size < \
        (variants / "merged" / "model.safetensors").stat().st_size
    distilled = variants_report["distilled"].details
    assert distilled["student_layers"] == 1 and distilled["steps"] == 3
    assert math.isfinite(distilled["final_loss"]) and distilled["trained_params"] < distilled["student_params"]
    from safetensors.torch import load_file

    student, teacher = (load_file(variants / n / "model.safetensors") for n in ("distilled", "merged"))
    assert torch.equal(student["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])  # kept
    assert not torch.equal(student["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.0.mlp.up_proj.weight"])


def test_magnitude_pruning_reaches_the_declared_sparsity(compressed, tmp_path):
    ctx = BuildContext(base_path="", adapter=Path(), work=compressed["out"] / "variants", calibration=None,
                       distill=None)
    details = Pruned(PrunedSpec(sparsity=0.3)).build(ctx, tmp_path)
    assert details["achieved_sparsity"] == pytest.approx(0.3, abs=0.01)


def test_chosen_variant_outputs_and_report(compressed):
    out = compressed["out"]
    report = compressed["report"]
    assert report.chosen in VARIANTS and report.reason
    info = json.loads((out / "model" / "variant.json").read_text())
    assert info["name"] == report.chosen
    text = (out / "report.md").read_text()
    assert "| int4_weight |" in text or "| int4_weight (chosen) |" in text
    assert "Against the parent" in text and f"Chosen: {report.chosen}" in text and "tok/s b3" in text
    rows = (out / "quality_speed.csv").read_text().splitlines()
    assert rows[0].startswith("variant,tokens_per_s_batch1,exact_match,size_mib") and len(rows) == 1 + len(VARIANTS)
    assert (out / "quality_vs_speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def registry_in(tmp_path):
    with sqlite_registry(tmp_path, "compress"):
        yield


def test_registered_version_holds_the_chosen_variant(compressed, tmp_path, registry_in):
    result = register_run(compressed["tiny_run"], tmp_path / "register", "triage-compressed",
                          {"compress": compressed["out"]})
    folder = mlflow.artifacts.download_artifacts("models:/triage-compressed@challenger", dst_path=str(tmp_path / "d"))
    manifest = json.loads(open(f"{folder}/llmops-model.json").read())
    chosen = compressed["report"].chosen
    assert manifest["serving"]["variant"] == chosen
    for name, digest in manifest["serving"]["files_sha256"].items():
        assert file_sha256(Path(folder) / "serving" / name) == digest
    for part in ("serving", "adapter"):
        assert_fast_tokenizer(Path(folder) / part)
    assert "## Serving variant" in open(f"{folder}/README.md").read()
    version = mlflow.MlflowClient().get_model_version("triage-compressed", result.report.version)
    assert version.tags["serving_variant"] == chosen
    ids = list(range(5, 40))
    assert torch.equal(_logits(Path(folder) / "serving", ids), _logits(compressed["out"] / "model", ids))


def test_unmergeable_adapter_is_refused(tiny, tmp_path):
    from components.finetune import FinetuneSpec, fit

    cfg = FinetuneSpec(base_model=str(tiny), method={"kind": "prompt_tuning", "num_virtual_tokens": 4}, max_steps=1,
                       batch_size=2, warmup_steps=0, eval_every=1, eval_examples=2)
    fit(cfg, str(tiny), chat_examples(4, 100), chat_examples(2, 200), tmp_path / "ft", tmp_path / "ck", progress=False)
    ctx = BuildContext(base_path=str(tiny), adapter=tmp_path / "ft" / "adapter", work=tmp_path, calibration=None,
                       distill=None)
    with pytest.raises(StageError, match="cannot be merged"):
        Merged().build(ctx, tmp_path / "merged")


# ---------------------------------------------------------------- another model family

@pytest.fixture(scope="module")
def neox_run(tiny, tmp_path_factory):
    """A tiny GPT-NeoX (fused QKV, a plain MLP, an untied output head: nothing like Llama)
    with SmolLM2's tokenizer, fine-tuned and evaluated like the tiny Llama."""
    import shutil

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from components.evaluate import EvaluateSpec
    from components.evaluate import run as evaluate
    from components.finetune import FinetuneSpec, fit
    from components.reports import TrainingReport
    from tests.components.conftest import triage_examples, write_prepared

    root = tmp_path_factory.mktemp("neox")
    model_dir = root / "neox"
    config = GPTNeoXConfig(vocab_size=49152, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                           pad_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny / f).exists():
            shutil.copy(tiny / f, model_dir / f)
    splits = write_prepared(root / "prepare", {"train": triage_examples(12, 100), "validation": triage_examples(4, 200),
                                               "test": triage_examples(6)})
    ft_cfg = FinetuneSpec(base_model=str(model_dir), max_steps=2, batch_size=4, warmup_steps=1, eval_every=2,
                          eval_examples=4, method={"kind": "lora", "r": 4, "alpha": 8, "last_layers": 1})
    TrainingReport(**fit(ft_cfg, str(model_dir), triage_examples(12, 100), triage_examples(4, 200),
                         root / "finetune", root / "ckpt", progress=False)).write(root / "finetune")
    (root / "evaluate").mkdir()
    evaluate(EvaluateSpec(batch_size=3, max_new_tokens=8, latency_requests=1),
             StageIO(pipeline="t", out_dir=root / "evaluate", state_dir=root / "state",
                     inputs={"prepare": root / "prepare", "finetune": root / "finetune"},
                     sections={"finetune": ft_cfg})).report.write(root / "evaluate")
    return {"root": root, "finetune": ft_cfg, "splits": splits, "tiny": model_dir}


def test_another_family_goes_through_compress_and_register(neox_run, tmp_path, registry_in):
    # onnx is not listed: built as int8_weight's parent, not measured
    cfg = CompressSpec(variants=["int8_weight", "pruned", "distilled"], keep_variants=True,
                       budget=BudgetSpec(min_jaccard_at_1=0.0, exact_match_drop=1.0),
                       measure=MeasureSpec(max_new_tokens=6, latency_requests=1, forward_repeats=1, batch_size=3),
                       pruned=PrunedSpec(method="structured", sparsity=0.25),
                       distilled=DistilledSpec(student=StudentSpec(layers=1), max_steps=2, batch_size=2))
    done = _compress(tmp_path, neox_run, cfg)
    report = done["report"]
    assert set(report.variants) == {"merged", "int8_weight", "pruned", "distilled"}
    built = report.variants["int8_weight"]
    assert built.parent == "onnx" and built.vs_parent == {} and built.jaccard_at_1_vs_parent is None
    assert report.variants["pruned"].jaccard_at_1_vs_parent is not None  # a measured parent is compared
    variants = done["out"] / "variants"
    ids = list(range(5, 40))
    reference = _logits(variants / "merged", ids)
    assert torch.allclose(_logits(variants / "onnx", ids), reference, atol=1e-4)
    error = (_logits(variants / "int8_weight", ids) - reference).abs().mean().item() / reference.std().item()
    assert 0 < error < 0.15  # as on the tiny Llama
    import onnx
    from collections import Counter

    ops = Counter(n.op_type for n in onnx.load(variants / "int8_weight" / "model.onnx").graph.node)
    assert ops["MatMulNBits"] == 2 * 4 + 1  # per block: fused qkv, dense, h_to_4h, 4h_to_h; and the head
    pruned = json.loads((variants / "pruned" / "config.json").read_text())
    # 25% of each block's linear weights: 40 of 96 MLP channels (the fused QKV, as wide as the MLP, is left alone)
    assert pruned["intermediate_size"] == 56 and report.variants["pruned"].details["achieved_sparsity"] == 0.25
    assert json.loads((variants / "distilled" / "config.json").read_text())["num_hidden_layers"] == 1
    result = register_run(neox_run, tmp_path / "register", "neox-triage", {"compress": done["out"]})
    assert result.report.serving_variant == report.chosen
