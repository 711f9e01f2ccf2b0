"""evaluate: the fine-tuned model and its base model, side by side, on the test split.

Both answer every test chat by greedy decoding (deterministic), in batches of similar
prompt length. An answer counts as valid JSON when it is one JSON object with exactly the
keys ``intent``, ``priority`` and ``article_id`` holding strings; exact match needs all
three right. Also measured: perplexity of the gold answers (teacher-forced, answer tokens
only), latency per request at batch 1 (p50/p95 over ``latency_requests`` chats) and
generated tokens/s of the batched run. Per-slice exact match (by channel, by plan) and an
intent confusion matrix show where the errors are.

The base model's result depends only on its weights, the test set and these settings, so
it is cached under ``<state_dir>/cache/evaluate/`` by their hashes and reused.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from pathlib import Path

from pydantic import Field

from components import tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table, write_json
from components.models import check_safe_weights, weights_sha256

OUTPUTS = ("predictions.jsonl", "confusion_intent.csv", "report.md")
LABELS = ("intent", "priority", "article_id")
INVALID = "(invalid)"  # the predicted class of an answer that is not valid JSON
CACHE_VERSION = 1  # bump when the scoring or the generation changes


class EvaluateSpec(StrictModel):
    batch_size: int = Field(16, gt=0)  # chats generated together
    max_new_tokens: int = Field(48, gt=0)  # the answer is ~25 tokens; a model that rambles is cut here
    max_examples: int | None = Field(None, gt=0)  # first N test chats only; null: all
    latency_requests: int = Field(16, ge=0)  # chats answered one at a time for the latency percentiles
    slices: list[str] = ["channel", "plan"]  # example meta fields to break exact match down by
    cache_base: bool = True  # reuse the base model's result when weights, test set and settings match


# ---------------------------------------------------------------- scoring (pure)

def parse_answer(text: str) -> dict | None:
    """The answer as a dict, or None unless it is exactly one JSON object with the three
    label keys holding strings (surrounding whitespace is allowed, nothing else)."""
    try:
        obj = json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != set(LABELS) or not all(isinstance(obj[k], str) for k in LABELS):
        return None
    return obj


def score(golds: list[dict], answers: list[str]) -> dict:
    """Headline metrics of ``answers`` (raw model outputs) against ``golds`` (label dicts)."""
    if len(golds) != len(answers):
        raise ValueError(f"{len(golds)} gold labels but {len(answers)} answers")
    n = len(golds)
    parsed = [parse_answer(a) for a in answers]
    out = {"n": n, "json_valid_rate": _rate(sum(p is not None for p in parsed), n)}
    for key in LABELS:
        name = "article_accuracy" if key == "article_id" else f"{key}_accuracy"
        out[name] = _rate(sum(p is not None and p[key] == g[key] for p, g in zip(parsed, golds)), n)
    out["exact_match"] = _rate(sum(p is not None and all(p[k] == g[k] for k in LABELS)
                                   for p, g in zip(parsed, golds)), n)
    return out


def slice_metrics(metas: list[dict], golds: list[dict], answers: list[str], fields: list[str]) -> dict:
    """Exact match and count per value of each meta field, e.g. {"channel": {"email": {...}}}."""
    out: dict[str, dict] = {}
    for field in fields:
        groups: dict[str, list[int]] = {}
        for i, meta in enumerate(metas):
            groups.setdefault(str(meta.get(field)), []).append(i)
        out[field] = {value: {"n": len(idx), "exact_match": score([golds[i] for i in idx],
                                                                   [answers[i] for i in idx])["exact_match"]}
                      for value, idx in sorted(groups.items())}
    return out


def confusion(golds: list[dict], answers: list[str], key: str = "intent") -> Counter:
    """(gold, predicted) -> count; an invalid answer predicts ``(invalid)``."""
    counts: Counter = Counter()
    for gold, answer in zip(golds, answers):
        parsed = parse_answer(answer)
        counts[(gold[key], parsed[key] if parsed else INVALID)] += 1
    return counts


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _rate(k: int, n: int) -> float:
    return round(k / n, 4) if n else 0.0


# ---------------------------------------------------------------- generation

def prompt_ids(example: dict, tokenizer) -> list[int]:
    """The chat up to the assistant's turn, as the model sees it at serving time."""
    return tokenizer.apply_chat_template(example["messages"][:-1], add_generation_prompt=True)


def generate(model, tokenizer, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
             on_batch=None) -> tuple[list[str], int, float]:
    """Greedy answers for token-id prompts, batched by similar length (left padding).
    Returns (answers in input order, generated tokens, seconds)."""
    import torch

    device = model.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    generated, started = 0, time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id) + 1]
            generated += len(new)
            answers[i] = tokenizer.decode(new, skip_special_tokens=True)
        if on_batch:
            on_batch(len(idx))
    return answers, generated, time.perf_counter() - started


def gold_perplexity(model, tokenizer, examples: list[dict], batch_size: int) -> float:
    """exp(mean negative log-likelihood of the gold answer tokens, incl. the end token)."""
    import torch

    from components.finetune import IGNORE, collate, encode

    device = model.device
    nll, count = 0.0, 0
    encoded = sorted((encode(e, tokenizer) for e in examples), key=lambda e: len(e[0]))
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            ids, labels, mask = (t.to(device) for t in collate(encoded[start:start + batch_size],
                                                                tokenizer.pad_token_id))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum")
            nll += loss.item()
            count += int((target != IGNORE).sum())
    return round(math.exp(nll / max(count, 1)), 4)


def evaluate_model(model, tokenizer, examples: list[dict], cfg: EvaluateSpec, label: str,
                   progress: bool = True) -> dict:
    """Every measurement of one model on ``examples``: metrics, slices, confusion, answers."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    model.eval()
    prompts = [prompt_ids(e, tokenizer) for e in examples]
    golds = [e["labels"] for e in examples]
    with Progress(TextColumn(f"evaluate {label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not progress) as bar:
        task = bar.add_task(label, total=len(examples))
        answers, generated, seconds = generate(model, tokenizer, prompts, cfg.batch_size, cfg.max_new_tokens,
                                               on_batch=lambda k: bar.advance(task, k))
    latencies = []
    for p in prompts[:cfg.latency_requests]:
        t0 = time.perf_counter()
        generate(model, tokenizer, [p], 1, cfg.max_new_tokens)
        latencies.append(time.perf_counter() - t0)
    metrics = score(golds, answers) | {
        "perplexity": gold_perplexity(model, tokenizer, examples, cfg.batch_size),
        "latency_p50_ms": None if not latencies else round(1000 * percentile(latencies, 50), 1),
        "latency_p95_ms": None if not latencies else round(1000 * percentile(latencies, 95), 1),
        "generated_tokens_per_s": round(generated / max(seconds, 1e-9), 1),
        "generation_seconds": round(seconds, 2),
    }
    return {"metrics": metrics, "slices": slice_metrics([e.get("meta", {}) for e in examples], golds, answers,
                                                        cfg.slices),
            "answers": answers}


def load_candidate(base_path: str, adapter_dir: Path, device):
    """The base model with the fine-tuned adapter (merged when the method allows: faster)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_safe_weights(Path(base_path))
    if not (adapter_dir / "adapter_model.safetensors").exists():
        raise StageError(f"{adapter_dir}: no adapter_model.safetensors (run the finetune stage)")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=False)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False)
    model = PeftModel.from_pretrained(base, adapter_dir)
    if model.peft_config["default"].peft_type.value in ("LORA", "IA3"):
        model = model.merge_and_unload()
    return tokenizer, model.to(device)


def load_base(base_path: str, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_safe_weights(Path(base_path))
    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    return tokenizer, model.to(device)


# ---------------------------------------------------------------- the stage

def run(cfg: EvaluateSpec, io: StageIO) -> StageResult:
    """Evaluate the fine-tuned adapter and the base model on prepare's test split."""
    import torch

    from components.finetune import base_model_of
    from components.prepare import read_examples

    base_path = base_model_of(io)
    test_path = io.inputs["prepare"] / "test.jsonl"
    examples = read_examples(test_path)[:cfg.max_examples]
    if not examples:
        raise StageError(f"{test_path}: no test examples")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    tokenizer, model = load_candidate(base_path, io.inputs["finetune"] / "adapter", device)
    candidate = evaluate_model(model, tokenizer, examples, cfg, "candidate")
    del model

    base_sha = weights_sha256(base_path, io.state_dir)
    settings = cfg.model_dump(exclude={"cache_base", "latency_requests"}) | {"version": CACHE_VERSION}
    key = json.dumps({"base": base_sha, "test": file_sha256(test_path), "settings": settings}, sort_keys=True)
    cache_file = io.state_dir / "cache" / "evaluate" / f"base-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if cfg.cache_base and cache_file.exists():
        base = json.loads(cache_file.read_text()) | {"cached": True}
    else:
        base_tok, base_model = load_base(base_path, device)
        base = evaluate_model(base_model, base_tok, examples, cfg, "base") | {"cached": False}
        del base_model
        write_json(cache_file, {k: v for k, v in base.items() if k != "cached"})

    golds = [e["labels"] for e in examples]
    with open(io.out_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for e, a, b in zip(examples, candidate["answers"], base["answers"]):
            fh.write(json.dumps({"ticket_id": e.get("ticket_id"), "gold": e["labels"], "candidate": a, "base": b,
                                 "exact_match": (parse_answer(a) or {}) == e["labels"]}, ensure_ascii=False) + "\n")
    counts = confusion(golds, candidate["answers"])
    with open(io.out_dir / "confusion_intent.csv", "w", encoding="utf-8") as fh:
        fh.write("actual,predicted\n")  # one row per example: DVC's confusion template counts them
        for (gold, pred), k in sorted(counts.items()):
            fh.write(f"{gold},{pred}\n" * k)

    c, b = candidate["metrics"], base["metrics"]
    metrics = {"candidate": c, "base": b, "base_cached": base["cached"],
               "exact_match_gain": round(c["exact_match"] - b["exact_match"], 4),
               "slices": {"candidate": candidate["slices"], "base": base["slices"]},
               "base_model_sha256": base_sha, "test_sha256": file_sha256(test_path)}
    headline = ("exact_match", "json_valid_rate", "intent_accuracy", "priority_accuracy", "article_accuracy",
                "perplexity", "latency_p50_ms", "latency_p95_ms", "generated_tokens_per_s")
    table = [{"metric": k, "candidate": c[k], "base": b[k]} for k in headline]
    slice_rows = [{"slice": f"{field}={value}", "n": m["n"], "candidate EM": m["exact_match"],
                   "base EM": base["slices"][field][value]["exact_match"]}
                  for field, values in candidate["slices"].items() for value, m in values.items()]
    intents = sorted({g for g, _ in counts})
    predicted = intents + sorted({p for _, p in counts if p not in intents})
    matrix = [{"actual \\ predicted": g, **{p: counts.get((g, p), 0) for p in predicted}} for g in intents]
    summary = (f"### evaluate\n{len(examples)} test chats, greedy decoding; base model result "
               f"{'from cache' if base['cached'] else 'computed'}.\n\n" + markdown_table(table)
               + "\n\n**Exact match by slice**\n\n" + markdown_table(slice_rows)
               + "\n\n**Intent confusion (candidate)**\n\n" + markdown_table(matrix))
    (io.out_dir / "report.md").write_text(summary + "\n", encoding="utf-8")
    tracking.log_dataset(test_path, metrics["test_sha256"], f"{io.pipeline}-test", "evaluation", rows=len(examples))
    for name in OUTPUTS:
        tracking.log_artifacts(io.out_dir / name, "evaluate")
    return StageResult(outputs={"predictions": io.out_dir / "predictions.jsonl",
                                "confusion_intent": io.out_dir / "confusion_intent.csv",
                                "report": io.out_dir / "report.md"},
                       metrics=metrics, summary=summary)
