"""The compress stage's chosen variant against the uncompressed fine-tuned model in PyTorch
fp32, each measured alone in a fresh process as the stage measures its variants
(components/compress/measure.py; nothing else should run on the machine): size on disk
(MiB), load time, forward latency, generated tokens/s at batch 1 and batched, exact match
and perplexity on validation chats, top-k next-token agreement. The targets: >= 2x the
tokens/s at batch 1, <= 35% of the size, <= 1 point of exact match lost.

    .venv/bin/python bench/compress_vs_fp32.py [--examples 189] [--requests 16] [--pipeline NAME]

Needs a pipeline run up to compress first: `llmops run --until compress` (it reads
prepare's validation split and answer schema, finetune's adapter and compress/model/ under
artifacts/<pipeline>/); exits 2 naming what is missing. The other settings of the
measurement (batch size, max_new_tokens, perplexity chats, forward repeats) are the
pipeline's compress.measure. Prints a table on stderr and one JSON line on stdout (with
the CPU's flags); exits 1 when a target is missed.

Expected duration with the defaults, on 2 cores, for SmolLM2-135M: ~6 min (merging ~15 s;
PyTorch fp32 ~3 min; an ONNX int8 variant ~1-2 min).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANT_FILE = "variant.json"  # what the compress stage writes into each variant's folder
TARGETS = {"min_speedup_batch1": 2.0, "max_size_ratio": 0.35, "max_exact_match_drop_points": 1.0}


def _unused(*_):
    raise RuntimeError("not needed to merge an adapter")


def main() -> int:
    from components.base import StageError
    from bench.common import base_model_or_exit
    from components.compress import TOP_K
    from components.compress.measure import cpu_flags, measure_alone
    from components.compress.variants import BuildContext, Merged
    from components.measure import jaccard
    from components.splits import read_examples
    from components.task import AnswerSchema
    from llmops.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--examples", type=int, default=189, help="validation chats (quality, tokens/s batched)")
    parser.add_argument("--requests", type=int, default=16, help="chats answered one at a time (batch 1)")
    args = parser.parse_args()

    spec = load_spec(ROOT / "pipelines.yaml")
    name, pipe = spec.pipeline(args.pipeline)
    artifacts = spec.artifacts_dir(ROOT) / name
    prepare, adapter = artifacts / "prepare", artifacts / "finetune" / "adapter"
    chosen = artifacts / "compress" / "model"
    needed = {prepare / "validation.jsonl": "prepare", adapter / "adapter_model.safetensors": "finetune",
              chosen / VARIANT_FILE: "compress"}
    missing = [f"{path} (the {stage} stage writes it)" for path, stage in needed.items() if not path.exists()]
    if missing:
        print("missing: " + "; ".join(missing) + f"\nrun `llmops run -p {name} --until compress` first",
              file=sys.stderr)
        return 2
    base = base_model_or_exit(spec, pipe)
    examples = read_examples(prepare / "validation.jsonl")[:args.examples]
    if not examples:
        print(f"{prepare / 'validation.jsonl'}: no validation chats to measure on", file=sys.stderr)
        return 2
    if (prepare / AnswerSchema.FILE).exists():
        schema = AnswerSchema.read(prepare / AnswerSchema.FILE)
    else:  # a prepare run from before the schema file: table-bound values from the gold answers
        bound = [f for f, spec_ in pipe.task.answer.items() if spec_.values_from]
        schema = AnswerSchema.of(pipe.task, {f: sorted({e["labels"][f] for e in examples}) for f in bound})
    cfg = pipe.compress.measure.model_copy(update={"examples": len(examples), "latency_requests": args.requests})
    variant = json.loads((chosen / VARIANT_FILE).read_text())["name"]

    rows, tops = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        merged.mkdir()
        print(f"merging {adapter} into {base} (PyTorch fp32)", file=sys.stderr, flush=True)
        try:
            Merged().build(BuildContext(base_path=base, adapter=adapter, work=Path(tmp), calibration=_unused,
                                        distill=_unused), merged)
        except StageError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        for label, folder in (("pytorch_fp32", merged), (variant, chosen)):
            print(f"measuring {label} on {len(examples)} chats", file=sys.stderr, flush=True)
            numbers, tops[label] = measure_alone(folder, examples, schema, cfg, max(TOP_K))
            rows[label] = {**{k: v for k, v in numbers.items() if k != "quality"},
                           # the quality's latency and tokens/s are those above under other names
                           **numbers["quality"].model_dump(mode="json", exclude={
                               "n", "batch_size", "latency_p50_ms", "latency_p95_ms", "generated_tokens_per_s"})}
    ref, new = rows["pytorch_fp32"], rows[variant]
    agreement = {k: jaccard(tops[variant], tops["pytorch_fp32"], k) for k in TOP_K}

    keys = [k for k in new if not isinstance(new[k], dict)]
    print(f"{len(examples)} validation chats, {args.requests} requests at batch 1; chosen variant: {variant}",
          file=sys.stderr)
    print(f"{'':26}{'pytorch fp32':>14}{variant:>14}", file=sys.stderr)
    for k in keys:
        print(f"{k:26}{str(ref.get(k, '')):>14}{str(new[k]):>14}", file=sys.stderr)
    for k, v in agreement.items():
        print(f"{f'jaccard_at_{k}':26}{'':>14}{v:>14}", file=sys.stderr)

    speedup = round(new["tokens_per_s_batch1"] / ref["tokens_per_s_batch1"], 2)
    size_ratio = round(new["size_mib"] / ref["size_mib"], 4)
    drop_points = round(100 * (ref["exact_match"] - new["exact_match"]), 1) + 0.0  # no -0.0
    ok = (speedup >= TARGETS["min_speedup_batch1"] and size_ratio <= TARGETS["max_size_ratio"]
          and drop_points <= TARGETS["max_exact_match_drop_points"])
    print(f"tokens/s at batch 1: {speedup:.2f}x (target >= 2)   size: {100 * size_ratio:.1f}% (target <= 35%)   "
          f"exact match: {0.0 - drop_points:+.1f} pts (target >= -1)", file=sys.stderr)
    print(json.dumps({"benchmark": "compress_vs_fp32", "pipeline": name, "variant": variant,
                      "examples": len(examples), "requests_batch1": args.requests, "batch_size": cfg.batch_size,
                      "pytorch_fp32": ref, "chosen": new, "jaccard_at": agreement, "speedup_batch1": speedup,
                      "size_ratio": size_ratio, "exact_match_drop_points": drop_points, "targets": TARGETS,
                      "within_target": ok, "cpus": os.cpu_count(), "cpu_flags": cpu_flags()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
