"""One fine-tuning recipe, trained and scored: what the rows of docs/RESULTS.md's recipe
table come from. It trains with the finetune stage's own loop (components/finetune.py:
fit) on prepare's train split, with the spec's finetune settings except those given on
the command line, then answers the test split greedily (components/measure.py: measure)
and prints one JSON line: steps, seconds per step, best validation loss, exact match and
per-field accuracy, the CPU's flags.

    .venv/bin/python bench/finetune_recipe.py --steps 320 --batch-size 2 --last-layers all
    .venv/bin/python bench/finetune_recipe.py --steps 200 --batch-size 4 --last-layers 8
    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune_recipe.py --seed 8   # two at once on 2 cores

Needs prepare's splits (`llmops run --until prepare`; exits 2 when they are missing) and
the base model (`llmops models pull`). Expected duration on 2 cores, AVX2 only, fp32:
~3.5 s per step of 2 chats with adapters on all blocks (~20 min for 320 steps), plus ~6
min to answer the 202 test chats; about 2.7x less where the CPU has AVX512-BF16.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import torch

    from bench.common import base_model_or_exit
    from components.compress.measure import cpu_flags
    from components.finetune import fit
    from components.lm import load
    from components.measure import measure
    from components.splits import read_examples
    from components.task import AnswerSchema
    from llmops.spec import load_spec

    spec = load_spec(ROOT / "pipelines.yaml")
    name, pipe = spec.pipeline(None)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=pipe.finetune.max_steps)
    parser.add_argument("--batch-size", type=int, default=pipe.finetune.batch_size)
    parser.add_argument("--learning-rate", type=float, default=pipe.finetune.learning_rate)
    parser.add_argument("--last-layers", default=None, help="adapters on the last N blocks, or 'all'")
    parser.add_argument("--seed", type=int, default=pipe.finetune.seed, help="data order and initialisation")
    parser.add_argument("--prepared", default=str(spec.artifacts_dir(ROOT) / name / "prepare"))
    args = parser.parse_args()
    prepared = Path(args.prepared)
    if not (prepared / "train.jsonl").exists():
        print(f"{prepared}/train.jsonl not found: run `llmops run --until prepare` first", file=sys.stderr)
        return 2
    model_path = base_model_or_exit(spec, pipe)

    method = pipe.finetune.method.model_dump()
    if args.last_layers is not None:
        method["last_layers"] = None if args.last_layers == "all" else int(args.last_layers)
    cfg = pipe.finetune.model_copy(update={
        "max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate, "seed": args.seed,
        "method": type(pipe.finetune.method).model_validate(method), "checkpoint_every": 10**6})
    train = read_examples(prepared / "train.jsonl")
    validation = read_examples(prepared / "validation.jsonl")
    test = read_examples(prepared / "test.jsonl")
    schema = AnswerSchema.read(prepared / AnswerSchema.FILE)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        trained = fit(cfg, model_path, train, validation, Path(tmp), Path(tmp) / "ckpt", progress=True)
        train_s = time.perf_counter() - started
        tokenizer, model = load(model_path, adapter=Path(tmp) / "adapter")
        started = time.perf_counter()
        scored = measure(model, tokenizer, test, schema, pipe.evaluate.batch_size, pipe.evaluate.max_new_tokens,
                         progress=False).metrics
        eval_s = time.perf_counter() - started
    print(json.dumps({"benchmark": "finetune_recipe", "last_layers": cfg.method.last_layers,
                      "steps": trained["steps"], "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                      "seed": cfg.seed,
                      "precision": cfg.precision, "stopped_by": trained["stopped_by"],
                      "s_per_step": round(train_s / max(trained["steps"], 1), 2),
                      "best_val_loss": trained["best_val_loss"], "test_chats": len(test),
                      "exact_match": scored.exact_match, **scored.field_accuracy,
                      "json_valid_rate": scored.json_valid_rate, "train_s": round(train_s), "eval_s": round(eval_s),
                      "torch_threads": torch.get_num_threads(), "cpu_flags": cpu_flags()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
