"""Measuring a model on chats, the same way wherever a model is judged: evaluate (the
candidate and the base model), compress (every variant), gates (a champion evaluated
again) and, later, the endpoint's smoke checks.

One call answers every chat greedily in batches (rows stop once their text cannot become a
valid answer: the score is the same, sooner), scores the answers against the task's
schema, times ``latency_requests`` chats one at a time (generating to the end token or
``max_new_tokens``, as a client waits for it), and runs one teacher-forced pass
for the gold answers' perplexity (and, when asked, the top-k next-token ids at each answer
position, to compare two models).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from components.lm import generate, prompt_ids, teacher_forced
from components.reports import ModelMetrics
from components.stats import Latency
from components.task import AnswerSchema, cannot_be_answer


PREDICTIONS = "predictions.jsonl"  # evaluate's per-chat answers (a version keeps its copy)


def read_answers(path: Path) -> dict[str, str]:
    """ticket id -> the candidate's answer, from evaluate's ``predictions.jsonl``."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {str(r["ticket_id"]): r["candidate"] for r in rows}


def outcomes_by_chat(schema: AnswerSchema, examples: list[dict], answers: dict[str, str]
                     ) -> dict[str, dict[str, bool]]:
    """metric -> {ticket id -> right or not} for the examples that have an answer."""
    have = [e for e in examples if str(e.get("ticket_id")) in answers]
    right = schema.outcomes([e["labels"] for e in have], [answers[str(e.get("ticket_id"))] for e in have])
    return {metric: {str(e.get("ticket_id")): ok for e, ok in zip(have, values)} for metric, values in right.items()}


@dataclass
class Measured:
    metrics: ModelMetrics
    answers: list[str]
    slices: dict = field(default_factory=dict)
    tops: list = field(default_factory=list)  # per chat: top-k ids at each answer position
    latencies_s: list[float] = field(default_factory=list)  # one request at a time
    tokens_batch1: int = 0


def measure(model, tokenizer, examples: list[dict], schema: AnswerSchema, batch_size: int, max_new_tokens: int,
            latency_requests: int = 0, slice_by: list[str] | None = None, top_k: int = 0, label: str = "",
            progress: bool = True, perplexity_examples: int | None = None) -> Measured:
    """Answer, score and time ``model`` on ``examples`` (chats ending with the gold answer);
    the perplexity (and top-k ids) on the first ``perplexity_examples`` of them (None: all):
    a teacher-forced pass costs as much as answering."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    prompts = [prompt_ids(e["messages"][:-1], tokenizer) for e in examples]
    golds = [e["labels"] for e in examples]
    latencies, tokens_1 = [], 0
    for p in (prompts * latency_requests)[:latency_requests]:
        out = generate(model, tokenizer, [p], 1, max_new_tokens)
        latencies.append(out.seconds)
        tokens_1 += out.tokens
    with Progress(TextColumn(f"{label} batch {batch_size}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task(label, total=len(examples))
        out = generate(model, tokenizer, prompts, batch_size, max_new_tokens, stop_when=cannot_be_answer,
                       on_batch=lambda k: bar.advance(task, k))
    scored = examples[:perplexity_examples]
    perplexity, tops = teacher_forced(model, tokenizer, [e["messages"] for e in scored], batch_size, top_k)
    timed = Latency.of(latencies)
    metrics = ModelMetrics.from_outcomes(
        schema.outcomes(golds, out.texts), perplexity=perplexity, latency_requests=timed.requests,
        latency_p50_ms=timed.p50_ms, latency_p95_ms=timed.p95_ms, latency_max_ms=timed.max_ms,
        generated_tokens_per_s=round(out.tokens / max(out.seconds, 1e-9), 1), batch_size=batch_size,
        generation_seconds=round(out.seconds, 2))
    slices = schema.slices([e.get("meta", {}) for e in examples], golds, out.texts, slice_by or [])
    return Measured(metrics, out.texts, slices, tops, latencies, tokens_1)


def forward_p50_ms(model, prompts: list[list[int]], repeats: int) -> float:
    """Median time of one forward pass over a prompt (no generation), in ms."""
    import torch

    times = []
    with torch.no_grad():
        for p in (prompts * repeats)[:repeats]:
            ids = torch.tensor([p])
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            times.append(time.perf_counter() - t0)
    return round(1000 * float(np.median(times)), 1)


def jaccard(a: list, b: list, k: int) -> float:
    """Mean over chats of the mean over answer positions of |top-k(a) & top-k(b)| / |top-k(a) | top-k(b)|."""
    per_chat = []
    for x, y in zip(a, b):
        scores = [len(set(p[:k]) & set(q[:k])) / len(set(p[:k]) | set(q[:k])) for p, q in zip(x, y)]
        if scores:
            per_chat.append(sum(scores) / len(scores))
    return round(sum(per_chat) / len(per_chat), 4) if per_chat else 0.0
