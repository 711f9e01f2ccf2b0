"""Training throughput of the finetune stage against a plain transformers Trainer + peft
script: same data (prepare's train split, chats longer than max_seq_len left out of both),
same model, same LoRA config (r 16, alpha 32, all linear layers of every block), batch
size, learning rate, schedule (warmup, cosine to 10% of the peak) and number of steps.
Tokens/s = non-padding tokens trained on / seconds of the training loop (model loading and
encoding not counted).

    .venv/bin/python bench/finetune_vs_trainer.py [--steps 40] [--batch-size 4]

Runs fp32 (both weights and matrix products); where the CPU has bf16 (AVX512-BF16/AMX,
components/lm.py: cpu_has_bf16) it runs bf16 autocast too. Prints one JSON line: tokens/s
and seconds of each run, the ratio stage / Trainer per precision (target >= 1.0), the
CPU's flags; exits 1 when a ratio misses the target.

Needs prepare's train split: run `llmops run --until prepare` first (it reads
artifacts/<pipeline>/prepare/train.jsonl; exits 2 when it is missing), and the base model
(`llmops models pull`).

Expected duration with the defaults, on 2 cores: ~5 min per precision (two runs of 40
steps of batch 4 at ~200-300 tokens/s), ~10 min where the CPU has bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LORA = {"r": 16, "alpha": 32}
LEARNING_RATE, WARMUP_STEPS, MIN_LR_RATIO, MAX_SEQ_LEN, SEED = 2e-3, 5, 0.1, 384, 7
TARGET_RATIO = 1.0


def stage_run(model_path: str, examples: list[dict], args, precision: str) -> dict:
    """The project's finetune (components/finetune.py: fit), without validation or checkpoints."""
    from components.finetune import FinetuneSpec, LoraMethod, fit

    cfg = FinetuneSpec(method=LoraMethod(**LORA), max_steps=args.steps, batch_size=args.batch_size,
                       learning_rate=LEARNING_RATE, warmup_steps=WARMUP_STEPS, min_lr_ratio=MIN_LR_RATIO,
                       max_seq_len=MAX_SEQ_LEN, eval_every=10**6, checkpoint_every=10**6, precision=precision,
                       seed=SEED)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = fit(cfg, model_path, examples, [], Path(tmp), Path(tmp) / "ckpt", progress=False)
    return {"tokens_per_s": metrics["tokens_per_s"], "seconds": round(metrics["minutes"] * 60, 1),
            "steps": metrics["steps"], "examples": metrics["examples"], "dtype": metrics["dtype"]}


def trainer_run(model_path: str, examples: list[dict], args, bf16: bool) -> dict:
    """The script most people would write: Trainer, a padding collator, group_by_length."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from components.lm import encode

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    data = []
    for e in examples:
        ids, labels = encode(e["messages"], tokenizer)
        if len(ids) <= MAX_SEQ_LEN:  # what the stage trains on
            data.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    padder = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    counted = {"tokens": 0}

    def collate(features):
        batch = padder(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    timing = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timing["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            timing["end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                  learning_rate=LEARNING_RATE, warmup_steps=WARMUP_STEPS, weight_decay=0.0,
                                  lr_scheduler_type="cosine_with_min_lr",
                                  lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATIO}, max_grad_norm=1.0,
                                  group_by_length=True, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                                  logging_steps=10**6, save_strategy="no", report_to=[], seed=SEED,
                                  dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Clock()])
        with contextlib.redirect_stdout(sys.stderr):  # its summary dict: stdout is the one JSON line
            trainer.train()
    seconds = timing["end"] - timing["start"]
    return {"tokens_per_s": round(counted["tokens"] / seconds, 1), "seconds": round(seconds, 1),
            "steps": args.steps, "examples": len(data),
            "dtype": "float32 (bfloat16 autocast)" if bf16 else "float32"}


def main() -> int:
    import torch

    from bench.common import base_model_or_exit
    from components.compress.measure import cpu_flags
    from components.lm import cpu_has_bf16
    from components.splits import read_examples
    from llmops.spec import load_spec

    spec = load_spec(ROOT / "pipelines.yaml")
    name, pipe = spec.pipeline(None)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", default=str(spec.artifacts_dir(ROOT) / name / "prepare" / "train.jsonl"))
    parser.add_argument("--model", default=None, help="model folder (default: finetune.base_model of the spec)")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"{args.data} not found: run `llmops run --until prepare` first", file=sys.stderr)
        return 2
    model = args.model or base_model_or_exit(spec, pipe)
    examples = read_examples(Path(args.data))

    results, ratios = {}, {}
    for precision in (["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]):
        results[f"trainer_{precision}"] = trainer_run(model, examples, args, bf16=precision == "bf16")
        print(f"trainer {precision}: {results[f'trainer_{precision}']}", file=sys.stderr, flush=True)
        results[f"stage_{precision}"] = stage_run(model, examples, args, precision)
        print(f"stage   {precision}: {results[f'stage_{precision}']}", file=sys.stderr, flush=True)
        ratios[precision] = round(results[f"stage_{precision}"]["tokens_per_s"]
                                  / results[f"trainer_{precision}"]["tokens_per_s"], 2)
    ok = all(r >= TARGET_RATIO for r in ratios.values())
    print(json.dumps({"benchmark": "finetune_vs_trainer", "steps": args.steps, "batch_size": args.batch_size,
                      "lora": LORA, "runs": results, "ratio_stage_over_trainer": ratios,
                      "target_ratio": TARGET_RATIO, "within_target": ok, "cpus": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(),
                      "cpu_flags": cpu_flags()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
