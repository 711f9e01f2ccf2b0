"""Training throughput of the finetune stage against a plain transformers Trainer + peft
script: same data (prepare's train split), same model, same LoRA config, batch size,
learning rate and number of steps. Tokens/s = non-padding tokens trained on / seconds.

    .venv/bin/python bench/finetune_vs_trainer.py [--steps 40] [--batch-size 4]

Needs `llmops run --until prepare` first (it reads artifacts/support-triage/prepare/).
Prints one line per run and the ratio stage / Trainer (target >= 1.0).
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


def stage_run(model_path: str, examples: list[dict], args, precision: str) -> dict:
    from components.finetune import FinetuneSpec, LoraMethod, train

    cfg = FinetuneSpec(method=LoraMethod(r=16, alpha=32), max_steps=args.steps, batch_size=args.batch_size,
                       learning_rate=2e-3, warmup_steps=5, eval_every=10**6, checkpoint_every=10**6,
                       precision=precision, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train(cfg, model_path, examples, [], Path(tmp), Path(tmp) / "ckpt", progress=False)
    return {"tokens_per_s": metrics["tokens_per_s"], "seconds": round(metrics["minutes"] * 60, 1),
            "dtype": metrics["dtype"]}


def trainer_run(model_path: str, examples: list[dict], args, bf16: bool) -> dict:
    """The script most people would write: Trainer, a padding collator, group_by_length."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from components.finetune import encode

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, use_safetensors=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    data = []
    for e in examples:
        ids, labels = encode(e, tokenizer)
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
                                  learning_rate=2e-3, warmup_steps=5, lr_scheduler_type="cosine",
                                  group_by_length=True, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                                  logging_steps=10**6, save_strategy="no", report_to=[], seed=7,
                                  dataloader_num_workers=0, disable_tqdm=True)
        Trainer(model=model, args=targs, train_dataset=data, data_collator=collate, callbacks=[Clock()]).train()
    seconds = timing["end"] - timing["start"]
    return {"tokens_per_s": round(counted["tokens"] / seconds, 1), "seconds": round(seconds, 1),
            "dtype": "float32 (bfloat16 autocast)" if bf16 else "float32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--data", default=str(ROOT / "artifacts" / "support-triage" / "prepare" / "train.jsonl"))
    parser.add_argument("--model", default=str(ROOT / ".llmops" / "models" / "smollm2-135m-instruct"))
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"{args.data} not found: run `llmops run --until prepare` first")
    with open(args.data, encoding="utf-8") as fh:
        examples = [json.loads(line) for line in fh]
    from components.finetune import cpu_has_bf16

    results = {}
    for precision in (["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]):
        bf16 = precision == "bf16"
        results[f"trainer {precision}"] = trainer_run(args.model, examples, args, bf16)
        print(f"trainer {precision}: {results[f'trainer {precision}']}", flush=True)
        results[f"stage {precision}"] = stage_run(args.model, examples, args, precision)
        print(f"stage   {precision}: {results[f'stage {precision}']}", flush=True)
        ratio = results[f"stage {precision}"]["tokens_per_s"] / results[f"trainer {precision}"]["tokens_per_s"]
        print(f"ratio stage/trainer ({precision}): {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
