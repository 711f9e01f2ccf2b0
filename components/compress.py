"""compress: smaller and faster variants of the fine-tuned model, each measured, one chosen.

Every variant descends from the fine-tuned model (base + adapter):

    merged        adapter merged into the base weights (safetensors, PyTorch fp32): the reference
    onnx          merged, exported through optimum with its KV cache, run by ONNX Runtime (fp32)
    int8_dynamic  onnx with int8 weights and per-batch activation scales (MatMulInteger)
    int8_static   onnx with int8 weights and activations, scales calibrated on training prompts (QDQ)
    int8_weight   onnx with blockwise 8-bit weights (MatMulNBits), int8 activations per block
    int4_weight   onnx with blockwise 4-bit weights (MatMulNBits), int8 activations per block
    pruned        merged with the smallest weights zeroed (magnitude) or MLP channels removed (structured)
    distilled     a smaller student trained on the merged model's softened next-token distribution

The quantized variants touch the MatMuls of the transformer blocks whose weight is a
constant; ``keep_fp32`` names (regular expressions on ONNX node names) keep some of those in
full precision: quantization error is not spread evenly, and on a 135M model a few layers
carry most of it (the MLP down projections, whose inputs have outliers, with one activation
scale per tensor in int8_dynamic). The weight-only variants can also quantize the output
head (an untied copy when it shares the embedding's weights) and store the token embedding
as 4-bit blocks (GatherBlockQuantized): on a 135M model the 49k x 576 embedding is a fifth of
the weights, and the head is most of the memory read per generated token.

Each variant is measured on the validation split, the same way, against its parent and
against the reference (``merged``): size on disk, load time, forward latency, generation
tokens/s at batch 1 and batch 8, request latency, the task metrics of the evaluate stage,
perplexity of the gold answers, and top-k next-token agreement (Jaccard of the top-k sets at
every gold answer position, k = 1, 3, 5, 10). The budget (exact match drop, Jaccard@1, an
optional perplexity ratio) decides which variants qualify; the objective (``smallest`` or
``fastest``) picks among them. When nothing else qualifies, ``merged`` is chosen. The chosen
variant is written to ``model/`` and the register stage adds it to the model version.
"""
from __future__ import annotations

import csv
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from components import tracking
from components.base import StageError, StageIO, StageResult, StrictModel, markdown_table, write_json
from components.evaluate import generate, percentile, prompt_ids, score
from components.models import ModelError, check_safe_weights, resolve

OUTPUTS = ("model", "report.md", "quality_speed.csv", "quality_vs_speed.png")
VARIANTS = ("merged", "onnx", "int8_dynamic", "int8_static", "int8_weight", "int4_weight", "pruned", "distilled")
PARENT = {"merged": None, "onnx": "merged", "int8_dynamic": "onnx", "int8_static": "onnx", "int8_weight": "onnx",
          "int4_weight": "onnx", "pruned": "merged", "distilled": "merged"}
REFERENCE = "merged"
TOP_K = (1, 3, 5, 10)
INFO_FILE = "variant.json"


# ---------------------------------------------------------------- spec

class Int8DynamicSpec(StrictModel):
    per_channel: bool = True  # one scale per output channel of each weight (else one per tensor)
    keep_fp32: list[str] = []  # regexes on ONNX node names: those MatMuls stay fp32


class Int8StaticSpec(StrictModel):
    per_channel: bool = True
    calibration_examples: int = Field(32, gt=0)  # training prompts run through the model to fix activation ranges
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    keep_fp32: list[str] = []


class WeightOnlySpec(StrictModel):
    block_size: int = Field(32, ge=16)  # weights per scale (power of two); smaller = more precise, larger file
    symmetric: bool = True  # no zero point per block
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4  # compute type: 4 = int8 activations per block (fastest on CPU),
    #                                             0/1 = fp32 activations
    output_head: bool = True  # quantize the output head too (untied from the embedding when they share weights)
    embedding_4bit: bool = True  # store the token embedding as 4-bit blocks (GatherBlockQuantized)
    keep_fp32: list[str] = []

    @model_validator(mode="after")
    def _power_of_two(self):
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        return self


class PrunedSpec(StrictModel):
    method: Literal["magnitude", "structured"] = "magnitude"  # magnitude: zero the smallest weights of each
    #   block linear layer (same file size, same speed on dense kernels); structured: remove the MLP channels
    #   with the smallest weight norms (a smaller model)
    sparsity: float = Field(0.2, gt=0, lt=1)  # share of the blocks' linear weights removed


class StudentSpec(StrictModel):
    layers: int | None = Field(15, gt=0)  # a copy of the teacher keeping this many evenly spaced blocks
    model: str | None = None  # or another local model (catalog name or folder) with the same tokenizer

    @model_validator(mode="after")
    def _one(self):
        if (self.layers is None) == (self.model is None):
            raise ValueError("give exactly one of student.layers and student.model")
        return self


class DistilledSpec(StrictModel):
    student: StudentSpec = StudentSpec()
    temperature: float = Field(2.0, gt=0)  # softens both distributions; the KL term is scaled by T^2
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the soft (KL) term; 1 - alpha on the gold-answer loss
    max_steps: int = Field(120, gt=0)
    max_minutes: float = Field(8, gt=0)  # wall-clock budget; training stops there
    batch_size: int = Field(4, gt=0)
    learning_rate: float = Field(1e-4, gt=0)  # the student's blocks are trained (the embedding/head stays)
    warmup_steps: int = Field(10, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # as in finetune
    seed: int = 7


class MeasureSpec(StrictModel):
    examples: int | None = Field(None, gt=0)  # first N validation chats; null: all
    batch_size: int = Field(8, gt=0)  # batched generation (tokens/s at batch 8, the task metrics)
    max_new_tokens: int = Field(48, gt=0)
    latency_requests: int = Field(8, gt=0)  # chats answered one at a time: tokens/s at batch 1, request latency
    forward_repeats: int = Field(10, gt=0)  # single forward passes over a prompt: forward latency p50


class BudgetSpec(StrictModel):
    exact_match_drop: float = Field(0.01, ge=0)  # at most this much below the reference (0.01 = 1 point)
    min_jaccard_at_1: float = Field(0.9, ge=0, le=1)  # top-1 next-token agreement with the reference
    max_perplexity_ratio: float | None = Field(None, ge=1)  # perplexity / reference perplexity; null: not checked


class CompressSpec(StrictModel):
    variants: list[Literal[VARIANTS]] = list(VARIANTS)  # merged is always built: the reference
    objective: Literal["smallest", "fastest"] = "smallest"  # smallest: size on disk; fastest: tokens/s at batch 1
    budget: BudgetSpec = BudgetSpec()
    measure: MeasureSpec = MeasureSpec()
    keep_variants: bool = False  # keep every variant under variants/ (else only model/, the chosen one)
    int8_dynamic: Int8DynamicSpec = Int8DynamicSpec()
    int8_static: Int8StaticSpec = Int8StaticSpec()
    int8_weight: WeightOnlySpec = WeightOnlySpec()
    int4_weight: WeightOnlySpec = WeightOnlySpec()
    pruned: PrunedSpec = PrunedSpec()
    distilled: DistilledSpec = DistilledSpec()


def build_order(requested: list[str]) -> list[str]:
    """The requested variants with the parents they are built from, parents first."""
    wanted: set[str] = set()
    for name in requested:
        while name is not None:
            wanted.add(name)
            name = PARENT[name]
    return [v for v in VARIANTS if v in wanted or v == REFERENCE]


# ---------------------------------------------------------------- building the variants

def _info(folder: Path, **info) -> None:
    write_json(folder / INFO_FILE, info)


def build_merged(base_path: str, adapter_dir: Path, out: Path) -> dict:
    import torch

    from components.evaluate import load_candidate

    tokenizer, model = load_candidate(base_path, adapter_dir, torch.device("cpu"))
    if hasattr(model, "peft_config"):
        raise StageError(f"{adapter_dir}: a {model.peft_config['default'].peft_type.value} adapter cannot be merged "
                         "into the base weights; compress needs lora, dora or ia3")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"format": "safetensors"}


def build_onnx(merged: Path, out: Path) -> dict:
    import warnings

    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    with warnings.catch_warnings():  # the tracer's notes on Python control flow it records as constants
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated")
        model = ORTModelForCausalLM.from_pretrained(merged, export=True, use_cache=True, trust_remote_code=False)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(merged).save_pretrained(out)
    return {"format": "onnx"}


def weight_matmuls(onnx_file: Path, keep_fp32: list[str]) -> tuple[list[str], list[str]]:
    """(names of the blocks' MatMuls with a constant weight to quantize, names kept fp32).
    Activation x activation MatMuls (attention scores) and the output head are never listed."""
    import onnx

    graph = onnx.load(onnx_file, load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    eligible = [n.name for n in graph.node
                if n.op_type == "MatMul" and "/layers." in n.name and any(i in constants for i in n.input)]
    kept = [n for n in eligible if any(re.search(p, n) for p in keep_fp32)]
    return [n for n in eligible if n not in kept], kept


def _copy_side_files(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx") and f.name != INFO_FILE:
            shutil.copy2(f, out / f.name)


def quantize_int8_dynamic(onnx_dir: Path, out: Path, cfg: Int8DynamicSpec) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes, kept = weight_matmuls(onnx_dir / "model.onnx", cfg.keep_fp32)
    _copy_side_files(onnx_dir, out)
    quantize_dynamic(onnx_dir / "model.onnx", out / "model.onnx", per_channel=cfg.per_channel,
                     weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes)
    return {"format": "onnx", "quantized_matmuls": len(nodes), "fp32_matmuls": len(kept)}


class _Calibration:
    """Feeds training prompts (empty KV cache) to ONNX Runtime's calibrator."""

    def __init__(self, onnx_dir: Path, prompts: list[list[int]]):
        import numpy as np

        config = json.loads((onnx_dir / "config.json").read_text())
        heads = config.get("num_key_value_heads", config["num_attention_heads"])
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        empty = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
        self._feeds = iter([
            {"input_ids": np.array([p], dtype=np.int64), "attention_mask": np.ones((1, len(p)), dtype=np.int64),
             "position_ids": np.arange(len(p), dtype=np.int64)[None],
             **{f"past_key_values.{i}.{kv}": empty for i in range(config["num_hidden_layers"]) for kv in ("key", "value")}}
            for p in prompts])

    def get_next(self):
        return next(self._feeds, None)


def quantize_int8_static(onnx_dir: Path, out: Path, cfg: Int8StaticSpec, prompts: list[list[int]]) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes, kept = weight_matmuls(onnx_dir / "model.onnx", cfg.keep_fp32)
    _copy_side_files(onnx_dir, out)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.method]
    quantize_static(onnx_dir / "model.onnx", out / "model.onnx", _Calibration(onnx_dir, prompts),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                    per_channel=cfg.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=method)
    return {"format": "onnx", "quantized_matmuls": len(nodes), "fp32_matmuls": len(kept),
            "calibration_prompts": len(prompts)}


def untie_output_head(model) -> str | None:
    """Give the output head (the MatMul that writes ``logits``) its own constant weight when
    the export computes it as Transpose(embedding), so it can be quantized on its own; returns
    its node name, or None when the graph has no such MatMul."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMul" and "logits" in n.output), None)
    if head is None:
        return None
    constants = {t.name: t for t in graph.initializer}
    if head.input[1] not in constants:
        transpose = next((n for n in graph.node if head.input[1] in n.output), None)
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in constants:
            return None
        weight = numpy_helper.to_array(constants[transpose.input[0]])
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        untied = np.ascontiguousarray(weight.transpose(perm) if perm else weight.T)
        graph.initializer.append(numpy_helper.from_array(untied, "lm_head.weight.untied"))
        head.input[1] = "lm_head.weight.untied"
        if not any(transpose.output[0] in n.input for n in graph.node):
            graph.node.remove(transpose)
    return head.name


def quantize_weight_only(onnx_dir: Path, out: Path, cfg: WeightOnlySpec, bits: int) -> dict:
    """Blockwise weight-only quantization (MatMulNBits) of the blocks' MatMuls, the output head
    and, at 4 bits, the token embedding (GatherBlockQuantized: ONNX Runtime has no 8-bit one)."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    nodes, kept = weight_matmuls(onnx_dir / "model.onnx", cfg.keep_fp32)
    _copy_side_files(onnx_dir, out)
    model = onnx.load(onnx_dir / "model.onnx")
    head = untie_output_head(model) if cfg.output_head else None
    if head:
        nodes.append(head)
    passes = [(bits, ("MatMul",), nodes)]
    if cfg.embedding_4bit:
        constants = {t.name for t in model.graph.initializer}
        embedding = [n.name for n in model.graph.node
                     if n.op_type == "Gather" and n.input[0] in constants and n.input[1] == "input_ids"]
        passes.append((4, ("Gather",), embedding))
    for n_bits, ops, include in passes:
        if not include:
            continue
        algo = DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                            accuracy_level=cfg.accuracy_level, bits=n_bits, op_types_to_quantize=ops,
                                            quant_axes=(("MatMul", 0), ("Gather", 1)))
        quantizer = MatMulNBitsQuantizer(model, algo_config=algo, nodes_to_include=include)
        with np.errstate(invalid="ignore", divide="ignore"):  # all-zero blocks: scale 0, handled by the quantizer
            quantizer.process()
        model = quantizer.model.model
    onnx.save(model, out / "model.onnx")
    return {"format": "onnx", "bits": bits, "quantized_matmuls": len(nodes), "fp32_matmuls": len(kept),
            "output_head_quantized": bool(head), "embedding_4bit": cfg.embedding_4bit}


def _block_linears(model) -> list:
    import torch

    return [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]


def prune(merged: Path, out: Path, cfg: PrunedSpec) -> dict:
    """Magnitude: per block linear layer, zero the ``sparsity`` share of weights with the
    smallest |w|. Structured: per block, remove the MLP channels (a row of gate and up, a column
    of down) with the smallest |gate|*|up|*|down| norms, as many as make up ``sparsity`` of the
    block's linear weights. Returns the achieved sparsity (removed or zero / all block linear weights)."""
    import torch

    from components.models import load_causal_lm

    tokenizer, model = load_causal_lm(str(merged))
    total = sum(m.weight.numel() for m in _block_linears(model))
    with torch.no_grad():
        if cfg.method == "magnitude":
            for linear in _block_linears(model):
                w = linear.weight
                k = int(round(cfg.sparsity * w.numel()))
                if k:
                    cut = w.abs().flatten().kthvalue(k).values
                    w.masked_fill_(w.abs() <= cut, 0.0)
            removed = sum(int((m.weight == 0).sum()) for m in _block_linears(model))
        else:
            removed = 0
            hidden = model.config.hidden_size
            for layer in model.model.layers:
                mlp = layer.mlp
                per_block = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
                drop = int(round(cfg.sparsity * per_block / (3 * hidden)))
                width = mlp.up_proj.out_features
                if drop >= width:
                    raise StageError(f"pruned.sparsity {cfg.sparsity}: more than the MLP channels can give "
                                     f"(at most {3 * hidden * (width - 1) / per_block:.2f} with structured pruning)")
                norms = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
                         * mlp.down_proj.weight.norm(dim=0))
                keep = norms.argsort(descending=True)[:width - drop].sort().values
                for name in ("gate_proj", "up_proj"):
                    old = getattr(mlp, name)
                    new = torch.nn.Linear(hidden, len(keep), bias=old.bias is not None)
                    new.weight.copy_(old.weight[keep])
                    setattr(mlp, name, new)
                new = torch.nn.Linear(len(keep), hidden, bias=mlp.down_proj.bias is not None)
                new.weight.copy_(mlp.down_proj.weight[:, keep])
                mlp.down_proj = new
                removed += 3 * hidden * drop
            model.config.intermediate_size = model.model.layers[0].mlp.up_proj.out_features
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"format": "safetensors", "method": cfg.method, "declared_sparsity": cfg.sparsity,
            "achieved_sparsity": round(removed / total, 4)}


def distillation_loss(student_logits, teacher_logits, target, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, target), each a mean
    over the positions given (rows of the logits; ``target`` holds the gold next tokens). The T^2
    keeps the soft term's gradient on the scale of the hard one when T changes.
    Returns (loss, kl, ce)."""
    import torch.nn.functional as F

    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    ce = F.cross_entropy(student_logits.float(), target)
    return alpha * t * t * kl + (1 - alpha) * ce, kl, ce


def make_student(teacher: Path, spec: StudentSpec, models: dict, state_dir: Path):
    """The student: a copy of the teacher keeping ``layers`` evenly spaced blocks (first and last
    included), or another local model that shares the teacher's tokenizer."""
    from transformers import AutoTokenizer

    from components.models import load_causal_lm

    if spec.model is not None:
        try:
            path = resolve(spec.model, models, state_dir)
        except ModelError as exc:
            raise StageError(f"distilled.student.model: {exc}") from exc
        tokenizer, student = load_causal_lm(path)
        if tokenizer.get_vocab() != AutoTokenizer.from_pretrained(teacher).get_vocab():
            raise StageError(f"distilled.student.model {spec.model!r}: its tokenizer differs from the teacher's; "
                             "distillation compares next-token distributions, so the vocabularies must be the same")
        return student
    _, student = load_causal_lm(str(teacher))
    n = len(student.model.layers)
    if spec.layers >= n:
        raise StageError(f"distilled.student.layers {spec.layers}: the teacher has only {n} blocks; a student "
                         "needs fewer")
    keep = sorted({round(i * (n - 1) / max(spec.layers - 1, 1)) for i in range(spec.layers)})
    import torch

    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in keep)
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index  # the KV cache is indexed by position in the stack
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def distill(teacher_dir: Path, out: Path, cfg: DistilledSpec, train_examples: list[dict], models: dict,
            state_dir: Path, log=print) -> dict:
    import random

    import torch

    from components.finetune import IGNORE, answer_positions, batches, collate, encode, pick_device
    from components.models import load_causal_lm

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device, dtype, autocast = pick_device(cfg.precision)
    tokenizer, teacher = load_causal_lm(str(teacher_dir))
    teacher.to(device, dtype).eval()
    student = make_student(teacher_dir, cfg.student, models, state_dir).to(device, dtype).train()
    # The token embedding (tied to the output head) stays as it is: a fifth of the weights,
    # shared with the teacher's vocabulary, and the costliest part to train.
    student.get_input_embeddings().weight.requires_grad_(False)
    encoded = [encode(e, tokenizer) for e in train_examples]
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    order, epoch, step, started = [], 0, 0, time.perf_counter()
    stopped_by, last = "max_steps", {}
    while step < cfg.max_steps:
        if not order:
            order = batches([len(ids) for ids, _ in encoded], cfg.batch_size, cfg.seed, epoch)
            epoch += 1
        ids, labels, mask = (t.to(device) for t in collate([encoded[i] for i in order.pop()],
                                                           tokenizer.pad_token_id))
        keep, target = answer_positions(labels)  # the output head only from the first answer on
        answer = target != IGNORE
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[answer]
            s_logits = student(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits[answer]
        loss, kl, ce = distillation_loss(s_logits, t_logits, target[answer], cfg.temperature, cfg.alpha)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last = {"loss": round(loss.item(), 4), "kl": round(kl.item(), 4), "ce": round(ce.item(), 4)}
        minutes = (time.perf_counter() - started) / 60
        if step % 10 == 0 or step == cfg.max_steps:
            log(f"distill step {step}/{cfg.max_steps}  loss {last['loss']:.4f} (kl {last['kl']:.4f}, "
                f"ce {last['ce']:.4f})  {60 * minutes / step:.2f} s/step")
        if minutes >= cfg.max_minutes and step < cfg.max_steps:
            stopped_by = "max_minutes"
            log(f"distill: {cfg.max_minutes} min budget reached at step {step}")
            break
    student.to(torch.float32).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"format": "safetensors", "student_layers": student.config.num_hidden_layers,
            "student_params": sum(p.numel() for p in student.parameters()),
            "trained_params": sum(p.numel() for p in student.parameters() if p.requires_grad), "steps": step, "stopped_by": stopped_by,
            "minutes": round((time.perf_counter() - started) / 60, 2), **{f"final_{k}": v for k, v in last.items()}}


# ---------------------------------------------------------------- measuring

def load_variant(folder: Path):
    """(tokenizer, model) of a variant folder: ONNX Runtime for ONNX, PyTorch fp32 otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((folder / INFO_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if info["format"] == "onnx":
        from optimum.onnxruntime import ORTModelForCausalLM

        return tokenizer, ORTModelForCausalLM.from_pretrained(folder, use_cache=True, trust_remote_code=False)
    check_safe_weights(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    return tokenizer, model.eval()


def size_mb(folder: Path) -> float:
    files = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".onnx", ".onnx_data", ".data")]
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def teacher_forced(model, tokenizer, examples: list[dict], batch_size: int):
    """(perplexity of the gold answers, per example the top-10 next-token ids at each answer
    position) from one teacher-forced pass."""
    import torch

    from components.finetune import IGNORE, collate, encode

    encoded = [encode(e, tokenizer) for e in examples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    top: list = [None] * len(encoded)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, labels, mask = collate([encoded[i] for i in idx], tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum").item()
            count += int((target != IGNORE).sum())
            best = logits.topk(max(TOP_K), dim=-1).indices
            for row, i in enumerate(idx):
                top[i] = best[row][target[row] != IGNORE].numpy()
    return round(math.exp(nll / max(count, 1)), 4), top


def jaccard(a: list, b: list, k: int) -> float:
    """Mean over examples of the mean over answer positions of |top-k(a) & top-k(b)| / |top-k(a) | top-k(b)|."""
    per_example = []
    for x, y in zip(a, b):
        scores = [len(set(p[:k]) & set(q[:k])) / len(set(p[:k]) | set(q[:k])) for p, q in zip(x, y)]
        if scores:
            per_example.append(sum(scores) / len(scores))
    return round(sum(per_example) / len(per_example), 4) if per_example else 0.0


def measure_alone(folder: Path, examples: list[dict], cfg: MeasureSpec) -> tuple[dict, list]:
    """``measure`` in a fresh process, as serving loads a model: in one process, the thread
    pools of the models measured before (PyTorch's OpenMP, each ONNX Runtime session) keep
    spinning and took up to half the cores from the next one (int8_weight: 20 instead of 40
    tokens/s at batch 1 on 2 cores)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, folder, examples, cfg).result()


def measure(folder: Path, examples: list[dict], cfg: MeasureSpec) -> tuple[dict, list]:
    """Every measurement of one variant on ``examples``; returns (metrics, top-10 ids per example)."""
    import torch

    started = time.perf_counter()
    tokenizer, model = load_variant(folder)
    load_s = time.perf_counter() - started
    prompts = [prompt_ids(e, tokenizer) for e in examples]
    forward = []
    with torch.no_grad():
        for p in (prompts * cfg.forward_repeats)[:cfg.forward_repeats]:
            ids = torch.tensor([p])
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            forward.append(time.perf_counter() - t0)
    single, tokens_1, seconds_1 = [], 0, 0.0
    for p in (prompts * cfg.latency_requests)[:cfg.latency_requests]:
        _, generated, seconds = generate(model, tokenizer, [p], 1, cfg.max_new_tokens)
        single.append(seconds)
        tokens_1, seconds_1 = tokens_1 + generated, seconds_1 + seconds
    done = [0]

    def progress(k: int) -> None:  # a line per quarter: this is minutes for a PyTorch fp32 variant
        quarter = max(len(prompts) // 4, 1)
        if (done[0] + k) // quarter > done[0] // quarter or done[0] + k == len(prompts):
            print(f"  batch {cfg.batch_size}: {done[0] + k}/{len(prompts)} chats answered", flush=True)
        done[0] += k

    answers, tokens_8, seconds_8 = generate(model, tokenizer, prompts, cfg.batch_size, cfg.max_new_tokens,
                                            on_batch=progress)
    perplexity, top = teacher_forced(model, tokenizer, examples, cfg.batch_size)
    metrics = {
        "size_mb": size_mb(folder), "load_s": round(load_s, 2),
        "forward_p50_ms": round(1000 * percentile(forward, 50), 1),
        "tokens_per_s_batch1": round(tokens_1 / seconds_1, 1),
        "tokens_per_s_batch8": round(tokens_8 / seconds_8, 1),
        "request_latency_p50_ms": round(1000 * percentile(single, 50), 1),
        "request_latency_p95_ms": round(1000 * percentile(single, 95), 1),
        **score([e["labels"] for e in examples], answers), "perplexity": perplexity}
    metrics.pop("n", None)
    return metrics, top


# ---------------------------------------------------------------- comparing and choosing

def compare(m: dict, other: dict) -> dict:
    """How variant ``m`` stands against ``other`` (its parent or the reference)."""
    return {"exact_match_change": round(m["exact_match"] - other["exact_match"], 4),
            "perplexity_ratio": round(m["perplexity"] / other["perplexity"], 4),
            "size_ratio": round(m["size_mb"] / other["size_mb"], 4),
            "speedup_batch1": round(m["tokens_per_s_batch1"] / other["tokens_per_s_batch1"], 2),
            "speedup_batch8": round(m["tokens_per_s_batch8"] / other["tokens_per_s_batch8"], 2)}


def budget_breaks(m: dict, reference: dict, budget: BudgetSpec) -> list[str]:
    """The budget lines variant ``m`` breaks against the reference ([] = it qualifies)."""
    broke = []
    drop = reference["exact_match"] - m["exact_match"]
    if drop > budget.exact_match_drop + 1e-9:
        broke.append(f"exact match {-100 * drop:+.1f} pts (budget -{100 * budget.exact_match_drop:.1f})")
    if m["jaccard_at_1"] < budget.min_jaccard_at_1:
        broke.append(f"Jaccard@1 {m['jaccard_at_1']:.3f} < {budget.min_jaccard_at_1}")
    if budget.max_perplexity_ratio is not None:
        ratio = m["perplexity"] / reference["perplexity"]
        if ratio > budget.max_perplexity_ratio:
            broke.append(f"perplexity x{ratio:.3f} > x{budget.max_perplexity_ratio}")
    return broke


def select(variants: dict[str, dict], budget: BudgetSpec, objective: str,
           reference: str = REFERENCE) -> tuple[str, str, dict[str, list[str]]]:
    """(chosen variant, why, budget lines each variant broke). Among the variants within the
    budget, the smallest on disk or the most tokens/s at batch 1 (ties: the other criterion);
    the reference when no other variant qualifies."""
    if reference not in variants:
        raise StageError(f"no measurements of the reference variant {reference!r}")
    ref = variants[reference]
    broke = {name: budget_breaks(m, ref, budget) for name, m in variants.items() if name != reference}
    qualified = [name for name, lines in broke.items() if not lines]
    if not qualified:
        why = "; ".join(f"{name}: {', '.join(lines)}" for name, lines in broke.items())
        return reference, (f"no variant is within the budget, so the uncompressed {reference} model"
                           + (f" ({why})" if why else "")), broke
    if objective == "smallest":
        chosen = min(qualified, key=lambda n: (variants[n]["size_mb"], -variants[n]["tokens_per_s_batch1"]))
        what = f"smallest within the budget: {variants[chosen]['size_mb']} MB"
    else:
        chosen = min(qualified, key=lambda n: (-variants[n]["tokens_per_s_batch1"], variants[n]["size_mb"]))
        what = f"fastest within the budget: {variants[chosen]['tokens_per_s_batch1']} tokens/s at batch 1"
    m = variants[chosen]
    why = (f"{chosen}: {what} ({m['tokens_per_s_batch1'] / ref['tokens_per_s_batch1']:.2f}x the tokens/s and "
           f"{100 * m['size_mb'] / ref['size_mb']:.0f}% of the size of {reference}, exact match "
           f"{100 * (m['exact_match'] - ref['exact_match']):+.1f} pts, Jaccard@1 {m['jaccard_at_1']:.3f})")
    others = [f"{name}: {', '.join(lines)}" for name, lines in broke.items() if lines]
    if others:
        why += "; over budget: " + "; ".join(others)
    return chosen, why, broke


# ---------------------------------------------------------------- report

REPORT_COLUMNS = (("size_mb", "size MB"), ("load_s", "load s"), ("forward_p50_ms", "forward p50 ms"),
                  ("tokens_per_s_batch1", "tok/s b1"), ("tokens_per_s_batch8", "tok/s b8"),
                  ("request_latency_p95_ms", "request p95 ms"), ("exact_match", "EM"),
                  ("json_valid_rate", "JSON"), ("perplexity", "ppl"), ("jaccard_at_1", "J@1"),
                  ("jaccard_at_3", "J@3"), ("jaccard_at_5", "J@5"), ("jaccard_at_10", "J@10"))


def render_report(result: dict, n_examples: int) -> str:
    rows = [{"variant": name + (" (chosen)" if name == result["chosen"] else ""), "parent": m["parent"] or "-",
             **{label: m[key] for key, label in REPORT_COLUMNS},
             "within budget": "yes" if m["within_budget"] else "no"}
            for name, m in result["variants"].items()]
    parents = [{"variant": name, "vs": m["parent"], **{k: v for k, v in m["vs_parent"].items()},
                "J@1": m["jaccard_at_1_vs_parent"]}
               for name, m in result["variants"].items() if m["parent"]]
    return (f"### compress\n{n_examples} validation chats; every variant against the reference "
            f"({result['reference']}, PyTorch fp32); Jaccard = top-k next-token agreement with the reference "
            f"at the gold answer positions.\n\n" + markdown_table(rows)
            + "\n\n**Against the parent**\n\n" + markdown_table(parents)
            + f"\n\n**Chosen: {result['chosen']}** (objective: {result['objective']}). {result['reason']}\n")


def write_plot(result: dict, csv_path: Path, png_path: Path) -> None:
    """Quality vs speed: a CSV for `dvc plots` and a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "tokens_per_s_batch1", "exact_match", "size_mb", "jaccard_at_1"])
        for name, m in result["variants"].items():
            writer.writerow([name, m["tokens_per_s_batch1"], m["exact_match"], m["size_mb"], m["jaccard_at_1"]])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, m in result["variants"].items():
        chosen = name == result["chosen"]
        ax.scatter(m["tokens_per_s_batch1"], m["exact_match"], s=20 + m["size_mb"] / 3,
                   color="tab:green" if chosen else ("tab:blue" if m["within_budget"] else "tab:red"), alpha=0.7)
        ax.annotate(f"{name}\n{m['size_mb']:.0f} MB", (m["tokens_per_s_batch1"], m["exact_match"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ref = result["variants"][result["reference"]]
    ax.axhline(ref["exact_match"] - result["budget"]["exact_match_drop"], color="grey", ls="--", lw=1)
    ax.set_xlabel("generated tokens/s at batch 1")
    ax.set_ylabel("exact match (validation)")
    ax.set_title("compression: quality vs speed (marker area ~ size; green chosen, red over budget)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


# ---------------------------------------------------------------- the stage

def run(cfg: CompressSpec, io: StageIO) -> StageResult:
    """Build, measure and choose among the variants of the fine-tuned adapter."""
    from components.finetune import base_model_of
    from components.prepare import read_examples

    base_path = base_model_of(io)
    val_path = io.inputs["prepare"] / "validation.jsonl"
    examples = read_examples(val_path)[:cfg.measure.examples]
    if not examples:
        raise StageError(f"{val_path}: no validation examples to measure the variants on")
    work = io.out_dir / "variants"
    builders = {
        "merged": lambda out: build_merged(base_path, io.inputs["finetune"] / "adapter", out),
        "onnx": lambda out: build_onnx(work / "merged", out),
        "int8_dynamic": lambda out: quantize_int8_dynamic(work / "onnx", out, cfg.int8_dynamic),
        "int8_static": lambda out: quantize_int8_static(work / "onnx", out, cfg.int8_static, calibration_prompts()),
        "int8_weight": lambda out: quantize_weight_only(work / "onnx", out, cfg.int8_weight, 8),
        "int4_weight": lambda out: quantize_weight_only(work / "onnx", out, cfg.int4_weight, 4),
        "pruned": lambda out: prune(work / "merged", out, cfg.pruned),
        "distilled": lambda out: distill(work / "merged", out, cfg.distilled, read_examples(
            io.inputs["prepare"] / "train.jsonl"), io.models, io.state_dir),
    }

    def calibration_prompts() -> list[list[int]]:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(work / "merged")
        train = read_examples(io.inputs["prepare"] / "train.jsonl")[:cfg.int8_static.calibration_examples]
        return [prompt_ids(e, tokenizer) for e in train]

    measured, tops = {}, {}
    order = build_order(cfg.variants)
    for i, name in enumerate(order, 1):
        print(f"compress [{i}/{len(order)}] {name}: building", flush=True)
        out = work / name
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        info = builders[name](out)
        build_s = round(time.perf_counter() - t0, 1)
        _info(out, name=name, parent=PARENT[name], build_s=build_s, **info)
        print(f"compress [{i}/{len(order)}] {name}: built in {build_s} s, measuring on {len(examples)} chats",
              flush=True)
        metrics, tops[name] = measure_alone(out, examples, cfg.measure)
        measured[name] = {"parent": PARENT[name], "build_s": build_s,
                          "details": {k: v for k, v in info.items() if k != "format"}, "format": info["format"],
                          **metrics}
        m = measured[name]
        print(f"compress [{i}/{len(order)}] {name}: {m['size_mb']} MB, {m['tokens_per_s_batch1']} tok/s at batch 1, "
              f"exact match {m['exact_match']}, perplexity {m['perplexity']}", flush=True)

    for name, m in measured.items():
        for k in TOP_K:
            m[f"jaccard_at_{k}"] = jaccard(tops[name], tops[REFERENCE], k)
        parent = m["parent"]
        m["vs_reference"] = compare(m, measured[REFERENCE])
        m["vs_parent"] = compare(m, measured[parent]) if parent else {}
        m["jaccard_at_1_vs_parent"] = jaccard(tops[name], tops[parent], 1) if parent else None
    chosen, reason, broke = select(measured, cfg.budget, cfg.objective)
    for name, m in measured.items():
        m["budget_broken"] = broke.get(name, [])
        m["within_budget"] = not m["budget_broken"]
    result = {"chosen": chosen, "reason": reason, "reference": REFERENCE, "objective": cfg.objective,
              "budget": cfg.budget.model_dump(), "validation_examples": len(examples), "variants": measured}

    shutil.copytree(work / chosen, io.out_dir / "model")
    if not cfg.keep_variants:
        shutil.rmtree(work)
    summary = render_report(result, len(examples))
    (io.out_dir / "report.md").write_text(summary, encoding="utf-8")
    write_plot(result, io.out_dir / "quality_speed.csv", io.out_dir / "quality_vs_speed.png")
    for name in ("report.md", "quality_speed.csv", "quality_vs_speed.png"):
        tracking.log_artifacts(io.out_dir / name, "compress")
    print(f"compress: chose {chosen}", flush=True)
    return StageResult(outputs={name.split(".")[0]: io.out_dir / name for name in OUTPUTS},
                       metrics=result, summary=summary)
