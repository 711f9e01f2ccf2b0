"""compress: smaller and faster variants of the fine-tuned model, each measured, one chosen.

Every variant descends from the fine-tuned model (base + adapter); variants.py builds them:

    merged        adapter merged into the base weights (safetensors, PyTorch fp32): the reference
    onnx          merged, exported through optimum with its KV cache, run by ONNX Runtime (fp32)
    int8_dynamic  onnx with int8 weights and per-call activation scales (optimum's ORTQuantizer)
    int8_static   onnx with int8 weights and activations, scales calibrated on training prompts
    int8_weight   onnx with blockwise 8-bit weights (MatMulNBits), int8 activations per block
    int4_weight   onnx with blockwise 4-bit weights (MatMulNBits), int8 activations per block
    pruned        merged with the smallest weights zeroed (magnitude) or MLP channels removed
    distilled     a smaller student trained on merged's softened next-token distribution

A variant's parents are built first (``onnx`` before the ONNX variants); a parent that is not
itself requested is a build step, not a candidate, and is not measured. Each candidate and
the reference are measured in a fresh process (as serving loads it; in one process the thread
pools of the models measured before keep spinning and halve the next one's speed), on the
validation split, the same way (measure.py): size (MiB), load time, forward latency,
tokens/s at batch 1 and batched, request latency, the task metrics, perplexity, and top-k
next-token agreement with the reference. The budget decides which variants qualify; the
objective picks among them (report.py); ``merged`` when nothing else qualifies. The chosen
variant is written to ``model/`` and the register stage adds it to the model version.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Literal


from components import tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, write_json
from components.catalog import base_model_path
from components.compress.distill import DistilledSpec, distill
from components.compress.measure import MeasureSpec, compare, cpu_flags, measure_alone
from components.compress.report import BudgetSpec, render_report, select, write_plot
from components.compress.variants import (REFERENCE, VARIANTS, BuildContext, Int8DynamicSpec, Int8StaticSpec,
                                          PrunedSpec, WeightOnlySpec, ancestors, build_order,
                                          calibration_prompts)
from components.reports import CompressReport, VariantReport
from components.splits import read_examples
from components.task import AnswerSchema

OUTPUTS = ("model", "report.md", "quality_speed.csv", "quality_vs_speed.png")
TOP_K = (1, 3, 5, 10)


class CompressSpec(StrictModel):
    # The candidates; merged (the reference) is always built and measured, and a candidate's
    # parents (onnx for the ONNX variants) are built but measured only when listed.
    variants: list[Literal[tuple(VARIANTS)]] = ["int8_weight"]
    objective: Literal["smallest", "fastest"] = "smallest"  # smallest: MiB on disk; fastest: tokens/s at batch 1
    budget: BudgetSpec = BudgetSpec()
    measure: MeasureSpec = MeasureSpec()
    keep_variants: bool = False  # keep every variant under variants/ (else only model/, the chosen one)
    int8_dynamic: Int8DynamicSpec = Int8DynamicSpec()
    int8_static: Int8StaticSpec = Int8StaticSpec()
    int8_weight: WeightOnlySpec = WeightOnlySpec()
    int4_weight: WeightOnlySpec = WeightOnlySpec()
    pruned: PrunedSpec = PrunedSpec()
    distilled: DistilledSpec = DistilledSpec()


def run(cfg: CompressSpec, io: StageIO) -> StageResult:
    """Build, measure and choose among the variants of the fine-tuned adapter."""
    val_path = io.inputs["prepare"] / "validation.jsonl"
    examples = read_examples(val_path)[:cfg.measure.examples]
    if not examples:
        raise StageError(f"{val_path}: no validation examples to measure the variants on")
    schema = AnswerSchema.read(io.inputs["prepare"] / AnswerSchema.FILE)
    work = io.out_dir / "variants"
    # a distillation resumes only with the same teacher (adapter), data and settings
    key = hashlib.sha256((cfg.distilled.model_dump_json(exclude={"max_minutes"})
                          + file_sha256(io.inputs["finetune"] / "adapter" / "adapter_model.safetensors")
                          + file_sha256(io.inputs["prepare"] / "train.jsonl")).encode()).hexdigest()[:16]
    train = lambda: read_examples(io.inputs["prepare"] / "train.jsonl")  # noqa: E731
    ctx = BuildContext(
        base_path=base_model_path(io), adapter=io.inputs["finetune"] / "adapter", work=work,
        calibration=lambda n: calibration_prompts(work / "merged", train(), n),
        distill=lambda teacher, out: distill(teacher, out, cfg.distilled, train(), io.models, io.state_dir,
                                             io.state_dir / "checkpoints" / io.pipeline / f"distill-{key}"))
    measured: dict[str, dict] = {}
    tops: dict[str, list] = {}
    order = build_order(cfg.variants)
    for i, name in enumerate(order, 1):
        variant = VARIANTS[name](getattr(cfg, name, None))
        print(f"compress [{i}/{len(order)}] {name}: building", flush=True)
        out = work / name
        out.mkdir(parents=True)
        t0 = time.perf_counter()
        info = variant.build(ctx, out)
        build_s = round(time.perf_counter() - t0, 1)
        write_json(out / "variant.json", {"name": name, "parent": variant.parent, "build_s": build_s, **info})
        if name != REFERENCE and name not in cfg.variants:
            print(f"compress [{i}/{len(order)}] {name}: built in {build_s} s as a step towards "
                  f"{', '.join(v for v in cfg.variants if name in ancestors(v))}; not measured (not a candidate)",
                  flush=True)
            continue
        print(f"compress [{i}/{len(order)}] {name}: built in {build_s} s, measuring on {len(examples)} chats",
              flush=True)
        numbers, tops[name] = measure_alone(out, examples, schema, cfg.measure, max(TOP_K))
        measured[name] = {"parent": variant.parent, "format": info.pop("format"), "build_s": build_s,
                          "details": info, **numbers}
        m = measured[name]
        print(f"compress [{i}/{len(order)}] {name}: {m['size_mib']} MiB, {m['tokens_per_s_batch1']} tok/s at "
              f"batch 1, exact match {m['quality'].exact_match}, perplexity {m['quality'].perplexity}", flush=True)

    from components.measure import jaccard

    variants: dict[str, VariantReport] = {}
    for name, m in measured.items():
        parent = m["parent"]
        variants[name] = VariantReport(
            **m, jaccard_at={k: jaccard(tops[name], tops[REFERENCE], k) for k in TOP_K},
            jaccard_at_1_vs_parent=jaccard(tops[name], tops[parent], 1) if parent in measured else None,
            vs_reference=compare(m, measured[REFERENCE]),
            vs_parent=compare(m, measured[parent]) if parent in measured else {})
    chosen, reason, broke = select(variants, cfg.budget, cfg.objective)
    variants = {n: v.model_copy(update={"budget_broken": broke.get(n, [])}) for n, v in variants.items()}
    report = CompressReport(chosen=chosen, reason=reason, reference=REFERENCE, objective=cfg.objective,
                            budget=cfg.budget.model_dump(), validation_examples=len(examples),
                            batch_size=cfg.measure.batch_size, cpu=cpu_flags(), variants=variants)
    shutil.copytree(work / chosen, io.out_dir / "model")
    if not cfg.keep_variants:
        shutil.rmtree(work)
    summary = render_report(report)
    (io.out_dir / "report.md").write_text(summary, encoding="utf-8")
    write_plot(report, io.out_dir / "quality_speed.csv", io.out_dir / "quality_vs_speed.png")
    for name in ("report.md", "quality_speed.csv", "quality_vs_speed.png"):
        tracking.log_artifacts(io.out_dir / name, "compress")
    print(f"compress: chose {chosen}", flush=True)
    return StageResult(outputs={Path(name).stem: io.out_dir / name for name in OUTPUTS}, report=report,
                       summary=summary)
