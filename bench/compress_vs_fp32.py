"""The compress stage's chosen variant against the uncompressed fine-tuned model in PyTorch
fp32, measured alone (nothing else should run on the machine): size on disk, load time,
forward latency, generated tokens/s at batch 1 and batch 8, exact match and perplexity on
validation chats, top-k agreement. The targets: >= 2x the tokens/s at batch 1, <= 35% of
the size, <= 1 point of exact match lost.

    .venv/bin/python bench/compress_vs_fp32.py [--examples 189] [--requests 16]

Needs `llmops run` (or `llmops run --until compress`) first: it reads the adapter in
artifacts/support-triage/finetune/ and the chosen variant in .../compress/model/.
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


def main() -> int:
    from components.base import write_json
    from components.compress import INFO_FILE, TOP_K, MeasureSpec, build_merged, jaccard, measure_alone
    from components.catalog import resolve
    from components.prepare import read_examples
    from llmops.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--examples", type=int, default=189, help="validation chats (quality, tokens/s at batch 8)")
    parser.add_argument("--requests", type=int, default=16, help="chats answered one at a time (batch 1)")
    args = parser.parse_args()

    spec = load_spec(ROOT / "pipelines.yaml")
    name, pipe = spec.pipeline(args.pipeline)
    artifacts = ROOT / spec.services.storage.artifacts_dir / name
    chosen = artifacts / "compress" / "model"
    if not (chosen / INFO_FILE).exists():
        print(f"{chosen}: no compressed model; run `llmops run --until compress` first", file=sys.stderr)
        return 1
    examples = read_examples(artifacts / "prepare" / "validation.jsonl")[:args.examples]
    cfg = MeasureSpec(latency_requests=args.requests, forward_repeats=20, batch_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        merged.mkdir()
        base = resolve(pipe.finetune.base_model, spec.models, spec.state_dir(ROOT))
        write_json(merged / INFO_FILE, {"name": "merged", **build_merged(base, artifacts / "finetune" / "adapter",
                                                                          merged)})
        rows = {}
        for label, folder in (("pytorch_fp32", merged), ("chosen", chosen)):
            rows[label], top = measure_alone(folder, examples, cfg)
            rows[label]["_top"] = top
    variant = json.loads((chosen / INFO_FILE).read_text())["name"]
    ref, new = rows["pytorch_fp32"], rows["chosen"]
    for k in TOP_K:
        new[f"jaccard_at_{k}"] = jaccard(new["_top"], ref["_top"], k)
    for row in rows.values():
        row.pop("_top")
    print(f"{len(examples)} validation chats, {args.requests} requests at batch 1; chosen variant: {variant}")
    keys = [k for k in new if k in ref] + [f"jaccard_at_{k}" for k in TOP_K]
    print(f"{'':26}{'pytorch fp32':>14}{variant:>14}")
    for k in keys:
        print(f"{k:26}{ref.get(k, ''):>14}{new[k]:>14}")
    speed = new["tokens_per_s_batch1"] / ref["tokens_per_s_batch1"]
    size = new["size_mb"] / ref["size_mb"]
    drop = 100 * (ref["exact_match"] - new["exact_match"])
    print(f"tokens/s at batch 1: {speed:.2f}x (target >= 2)   size: {100 * size:.1f}% (target <= 35%)   "
          f"exact match: {-drop:+.1f} pts (target >= -1)")
    return 0 if speed >= 2 and size <= 0.35 and drop <= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
