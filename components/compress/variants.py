"""The compressed variants. Each is a class with its spec (the knobs in
``compress.<variant>``), the variant it is built from (``parent``) and ``build(ctx, out)``,
which writes the variant's folder and returns what it did; every variant is then measured
the same way (measure.py). Adding a variant is adding a class and a line in ``VARIANTS``.

Nothing here assumes an architecture: the transformer blocks are found by shape
(components/lm.py: decoder_layers), the ONNX MatMuls to quantize are those with a constant
weight except the output head, MLP channels are found by their width.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field, model_validator

from components.base import StageError, StrictModel
from components.catalog import ModelError
from components.compress.measure import cpu_flags
from components.lm import ONNX_FILE, decoder_layers, load, load_tokenizer, prompt_ids

# ---------------------------------------------------------------- specs


class Int8DynamicSpec(StrictModel):
    per_channel: bool = True  # one scale per output channel of each weight (else one per tensor)
    keep_fp32: list[str] = []  # regexes on ONNX node names: those MatMuls stay fp32
    # U8S8 int8 kernels saturate on x86 CPUs without VNNI: 7-bit weights avoid it. auto: on
    # unless this CPU has VNNI (a model built with it off breaks on a CPU without VNNI).
    reduce_range: bool | Literal["auto"] = True


class Int8StaticSpec(Int8DynamicSpec):
    calibration_examples: int = Field(32, gt=0)  # training prompts run through the model to fix activation ranges
    method: Literal["minmax", "entropy", "percentile"] = "minmax"


class WeightOnlySpec(StrictModel):
    block_size: int = Field(32, ge=16)  # weights per scale (power of two); smaller = more precise, larger file
    symmetric: bool = True  # no zero point per block
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4  # compute type: 4 = int8 activations per block, 0/1 = fp32
    output_head: bool = True  # quantize the output head too (untied from the embedding when they share weights)
    embedding_4bit: bool = True  # store the token embedding as 4-bit blocks (GatherBlockQuantized)
    keep_fp32: list[str] = []

    @model_validator(mode="after")
    def _power_of_two(self):
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        return self


class PrunedSpec(StrictModel):
    # magnitude: zero the smallest weights of each block linear layer (same size and speed on dense
    # kernels); structured: remove the MLP channels with the smallest weight norms (a smaller model)
    method: Literal["magnitude", "structured"] = "magnitude"
    sparsity: float = Field(0.2, gt=0, lt=1)  # share of the blocks' linear weights removed


@dataclass
class BuildContext:
    base_path: str  # the fine-tuned model's base
    adapter: Path  # its adapter
    work: Path  # variants/<name>/ folders live here
    calibration: Callable[[int], list[list[int]]]  # n -> token ids of n training prompts
    distill: Callable[[Path, Path], dict]  # (teacher folder, out) -> what distillation did


# ---------------------------------------------------------------- the variants

class Merged:
    """The adapter merged into the base weights (safetensors, PyTorch fp32): the reference."""

    parent = None

    def __init__(self, cfg=None):
        self.cfg = cfg

    def build(self, ctx: BuildContext, out: Path) -> dict:
        try:
            tokenizer, model = load(ctx.base_path, adapter=ctx.adapter)
        except ModelError as exc:
            raise StageError(str(exc)) from exc
        if hasattr(model, "peft_config"):
            raise StageError(f"{ctx.adapter}: a {model.peft_config['default'].peft_type.value} adapter cannot be "
                             "merged into the base weights; compress needs lora, dora or ia3")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return {"format": "safetensors"}


class Onnx(Merged):
    """merged, exported through optimum with its KV cache, run by ONNX Runtime (fp32)."""

    parent = "merged"

    def build(self, ctx: BuildContext, out: Path) -> dict:
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        with warnings.catch_warnings():  # the tracer's notes on Python control flow it records as constants
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated")
            model = ORTModelForCausalLM.from_pretrained(ctx.work / "merged", export=True, use_cache=True,
                                                        trust_remote_code=False)
        model.save_pretrained(out)
        load_tokenizer(ctx.work / "merged").save_pretrained(out)
        return {"format": "onnx"}


def weight_matmuls(onnx_file: Path, keep_fp32: list[str]) -> tuple[list[str], list[str]]:
    """(MatMuls with a constant weight to quantize, those kept fp32 by ``keep_fp32``). The
    output head (the MatMul that writes ``logits``) and activation x activation MatMuls
    (attention scores) are never listed."""
    import onnx

    graph = onnx.load(onnx_file, load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    eligible = [n.name for n in graph.node if n.op_type == "MatMul" and "logits" not in n.output
                and any(i in constants for i in n.input)]
    kept = [n for n in eligible if any(re.search(p, n) for p in keep_fp32)]
    return [n for n in eligible if n not in kept], kept


def _side_files(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(ONNX_FILE) and f.name != "variant.json":
            shutil.copy2(f, out / f.name)


class Int8Dynamic:
    """onnx with int8 weights and activation scales computed per call (MatMulInteger),
    through optimum's ORTQuantizer."""

    parent = "onnx"
    static = False

    def __init__(self, cfg: Int8DynamicSpec):
        self.cfg = cfg

    def _config(self, nodes: list[str]):
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        reduce_range = ("vnni" not in cpu_flags()) if self.cfg.reduce_range == "auto" else self.cfg.reduce_range
        return AutoQuantizationConfig.avx2(is_static=self.static, per_channel=self.cfg.per_channel,
                                           reduce_range=reduce_range, nodes_to_quantize=nodes,
                                           operators_to_quantize=["MatMul"]), reduce_range

    def ranges(self, ctx: BuildContext, onnx_dir: Path):
        return None

    def build(self, ctx: BuildContext, out: Path) -> dict:
        from optimum.onnxruntime import ORTQuantizer

        src = ctx.work / "onnx"
        nodes, kept = weight_matmuls(src / ONNX_FILE, self.cfg.keep_fp32)
        config, reduce_range = self._config(nodes)
        quantizer = ORTQuantizer.from_pretrained(src, file_name=ONNX_FILE)
        written = quantizer.quantize(config, save_dir=out, file_suffix="q",
                                     calibration_tensors_range=self.ranges(ctx, src))
        (Path(written) / "model_q.onnx").rename(out / ONNX_FILE)
        _side_files(src, out)
        return {"format": "onnx", "quantized_matmuls": len(nodes), "fp32_matmuls": len(kept),
                "reduce_range": reduce_range}


class _Calibration:
    """Feeds training prompts (empty KV cache) to ONNX Runtime's calibrator."""

    def __init__(self, onnx_dir: Path, prompts: list[list[int]]):
        import numpy as np

        config = json.loads((onnx_dir / "config.json").read_text())
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        empty = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
        self._feeds = iter([
            {"input_ids": np.array([p], dtype=np.int64), "attention_mask": np.ones((1, len(p)), dtype=np.int64),
             "position_ids": np.arange(len(p), dtype=np.int64)[None],
             **{f"past_key_values.{i}.{kv}": empty for i in range(config["num_hidden_layers"])
                for kv in ("key", "value")}}
            for p in prompts])

    def get_next(self):
        return next(self._feeds, None)


class Int8Static(Int8Dynamic):
    """onnx with int8 weights and activations, activation ranges calibrated once on training
    prompts (QDQ). optimum's own calibration reads a datasets.Dataset without a KV cache,
    so the ranges come from ONNX Runtime's calibrator and go to ORTQuantizer."""

    static = True

    def ranges(self, ctx: BuildContext, onnx_dir: Path):
        import tempfile

        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[self.cfg.method]
        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(onnx_dir / ONNX_FILE, ["MatMul"], Path(tmp) / "augmented.onnx", method)
            calibrator.collect_data(_Calibration(onnx_dir, ctx.calibration(self.cfg.calibration_examples)))
            return calibrator.compute_data()  # what ORTQuantizer passes on to ONNX Runtime's quantizer


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


class WeightOnly:
    """onnx with blockwise ``bits``-bit weights (MatMulNBits), the output head too, and the
    token embedding as 4-bit blocks (GatherBlockQuantized: ONNX Runtime has no 8-bit one)."""

    parent = "onnx"
    bits = 8

    def __init__(self, cfg: WeightOnlySpec):
        self.cfg = cfg

    def build(self, ctx: BuildContext, out: Path) -> dict:
        import numpy as np
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)

        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per skipped node
        src = ctx.work / "onnx"
        nodes, kept = weight_matmuls(src / ONNX_FILE, self.cfg.keep_fp32)
        _side_files(src, out)
        model = onnx.load(src / ONNX_FILE)
        head = untie_output_head(model) if self.cfg.output_head else None
        if head:
            nodes.append(head)
        passes = [(self.bits, ("MatMul",), nodes)]
        if self.cfg.embedding_4bit:
            constants = {t.name for t in model.graph.initializer}
            embedding = [n.name for n in model.graph.node
                         if n.op_type == "Gather" and n.input[0] in constants and n.input[1] == "input_ids"]
            passes.append((4, ("Gather",), embedding))
        for n_bits, ops, include in passes:
            if not include:
                continue
            algo = DefaultWeightOnlyQuantConfig(block_size=self.cfg.block_size, is_symmetric=self.cfg.symmetric,
                                                accuracy_level=self.cfg.accuracy_level, bits=n_bits,
                                                op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)))
            quantizer = MatMulNBitsQuantizer(model, algo_config=algo, nodes_to_include=include)
            with np.errstate(invalid="ignore", divide="ignore"):  # all-zero blocks: scale 0, handled there
                quantizer.process()
            model = quantizer.model.model
        onnx.save(model, out / ONNX_FILE)
        return {"format": "onnx", "bits": self.bits, "quantized_matmuls": len(nodes), "fp32_matmuls": len(kept),
                "output_head_quantized": bool(head), "embedding_4bit": self.cfg.embedding_4bit}


class Int4Weight(WeightOnly):
    bits = 4  # the same with 4-bit blocks


def block_linears(model) -> list:
    from torch.nn import Linear

    return [m for m in decoder_layers(model)[1].modules() if isinstance(m, Linear)]


class Pruned:
    """merged without its smallest weights (magnitude, torch.nn.utils.prune per block linear
    layer) or without its weakest MLP channels (structured: a smaller model)."""

    parent = "merged"

    def __init__(self, cfg: PrunedSpec):
        self.cfg = cfg

    def build(self, ctx: BuildContext, out: Path) -> dict:
        import torch
        from torch.nn.utils import prune

        tokenizer, model = load(ctx.work / "merged", device=torch.device("cpu"))
        linears = block_linears(model)
        total = sum(m.weight.numel() for m in linears)
        if self.cfg.method == "magnitude":
            for linear in linears:
                prune.l1_unstructured(linear, "weight", amount=self.cfg.sparsity)
                prune.remove(linear, "weight")
            removed = sum(int((m.weight == 0).sum()) for m in linears)
        else:
            removed = self._structured(model)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return {"format": "safetensors", "method": self.cfg.method, "declared_sparsity": self.cfg.sparsity,
                "achieved_sparsity": round(removed / total, 4)}

    def _structured(self, model) -> int:
        """Per block: drop the MLP channels (a row of each layer that widens to the MLP width,
        a column of the layer that narrows back) with the smallest product of weight norms."""
        import torch

        width = model.config.intermediate_size
        removed = 0
        for block in decoder_layers(model)[1]:
            linears = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
            down = {n: m for n, m in linears.items() if m.in_features == width}
            mlp = next(iter(down)).rpartition(".")[0] if len(down) == 1 else None
            # the widening layers sit beside the narrowing one (an attention projection may be as wide)
            up = {n: m for n, m in linears.items() if m.out_features == width and n.rpartition(".")[0] == mlp}
            if not up or len(down) != 1:
                raise StageError(f"pruned: structured pruning needs an MLP of width {width} (found {len(up)} "
                                 f"widening and {len(down)} narrowing layers in a block); use method: magnitude")
            per_block = sum(m.weight.numel() for m in linears.values())
            channel = sum(m.in_features for m in up.values()) + next(iter(down.values())).out_features
            drop = int(round(self.cfg.sparsity * per_block / channel))
            if drop >= width:
                raise StageError(f"pruned.sparsity {self.cfg.sparsity}: more than the MLP channels can give")
            (down_name, down_layer), = down.items()
            norms = down_layer.weight.norm(dim=0)
            for m in up.values():
                norms = norms * m.weight.norm(dim=1)
            keep = norms.argsort(descending=True)[:width - drop].sort().values
            with torch.no_grad():
                for name, old in [*up.items(), (down_name, down_layer)]:
                    narrowing = name == down_name
                    new = torch.nn.Linear(len(keep) if narrowing else old.in_features,
                                          old.out_features if narrowing else len(keep), bias=old.bias is not None)
                    new.weight.copy_(old.weight[:, keep] if narrowing else old.weight[keep])
                    if old.bias is not None:
                        new.bias.copy_(old.bias if narrowing else old.bias[keep])
                    parent, _, attr = name.rpartition(".")
                    setattr(block.get_submodule(parent) if parent else block, attr, new)
            removed += drop * channel
        model.config.intermediate_size = width - drop
        return removed


class Distilled:
    """A smaller student trained on merged's softened next-token distribution (distill.py)."""

    parent = "merged"

    def __init__(self, cfg):
        self.cfg = cfg

    def build(self, ctx: BuildContext, out: Path) -> dict:
        return ctx.distill(ctx.work / "merged", out)


VARIANTS: dict[str, type] = {"merged": Merged, "onnx": Onnx, "int8_dynamic": Int8Dynamic,
                             "int8_static": Int8Static, "int8_weight": WeightOnly, "int4_weight": Int4Weight,
                             "pruned": Pruned, "distilled": Distilled}
REFERENCE = "merged"


def ancestors(name: str) -> list[str]:
    """``name`` and the variants it is built from, nearest first."""
    chain = []
    while name is not None:
        chain.append(name)
        name = VARIANTS[name].parent
    return chain


def build_order(requested: list[str]) -> list[str]:
    """The requested variants with the parents they are built from, parents first."""
    wanted = {REFERENCE}.union(*(ancestors(name) for name in requested))
    return [v for v in VARIANTS if v in wanted]


def calibration_prompts(merged: Path, examples: list[dict], n: int) -> list[list[int]]:
    tokenizer = load_tokenizer(merged)
    return [prompt_ids(e["messages"][:-1], tokenizer) for e in examples[:n]]
