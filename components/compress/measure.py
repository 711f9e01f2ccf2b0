"""Measuring a compressed variant, the same way for every variant, in a fresh process.

In one process the thread pools of the models measured before (PyTorch's OpenMP, each ONNX
Runtime session) keep spinning and took up to half the cores from the next one (int8_weight:
20 instead of 40 tokens/s at batch 1 on 2 cores), so each variant is loaded and measured in
its own spawned process, as serving would load it.
"""
from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from components.base import StrictModel
from components.lm import load, prompt_ids, size_mib
from components.measure import forward_p50_ms, measure
from components.stats import Latency
from components.task import AnswerSchema


class MeasureSpec(StrictModel):
    examples: int | None = Field(None, gt=0)  # first N validation chats; null: all
    perplexity_examples: int | None = Field(None, gt=0)  # of those, the first N for perplexity and top-k agreement
    batch_size: int = Field(8, gt=0)  # batched generation (tokens/s batched, the task metrics)
    max_new_tokens: int = Field(48, gt=0)
    # Chats answered one at a time: tokens/s at batch 1, request latency (p95 needs >= 20).
    latency_requests: int = Field(20, gt=0)
    forward_repeats: int = Field(10, gt=0)  # single forward passes over a prompt: forward latency p50


def cpu_flags() -> str:
    """The instruction sets the quantized kernels care about, as this CPU has them."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none"


def measure_alone(folder: Path, examples: list[dict], schema: AnswerSchema, cfg: MeasureSpec,
                  top_k: int) -> tuple[dict, list]:
    """:func:`measure_variant` in a fresh spawned process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure_variant, folder, examples, schema, cfg, top_k).result()


def measure_variant(folder: Path, examples: list[dict], schema: AnswerSchema, cfg: MeasureSpec,
                    top_k: int) -> tuple[dict, list]:
    """(the variant's numbers, per chat the top-k ids at each gold answer position)."""
    started = time.perf_counter()
    tokenizer, model = load(folder)
    load_s = time.perf_counter() - started
    prompts = [prompt_ids(e["messages"][:-1], tokenizer) for e in examples]
    forward = forward_p50_ms(model, prompts, cfg.forward_repeats)
    done = measure(model, tokenizer, examples, schema, cfg.batch_size, cfg.max_new_tokens, cfg.latency_requests,
                   top_k=top_k, label=folder.name, progress=False, perplexity_examples=cfg.perplexity_examples)
    timed = Latency.of(done.latencies_s)
    return {"size_mib": size_mib(folder), "load_s": round(load_s, 2), "forward_p50_ms": forward,
            "tokens_per_s_batch1": round(done.tokens_batch1 / sum(done.latencies_s), 1),
            "tokens_per_s_batched": done.metrics.generated_tokens_per_s,
            "latency_requests": timed.requests, "request_latency_p50_ms": timed.p50_ms,
            "request_latency_p95_ms": timed.p95_ms, "request_latency_max_ms": timed.max_ms,
            "quality": done.metrics}, done.tops


def compare(m: dict, other: dict) -> dict[str, float]:
    """How variant ``m`` stands against ``other`` (its parent or the reference)."""
    return {"exact_match_change": round(m["quality"].exact_match - other["quality"].exact_match, 4),
            "perplexity_ratio": round(m["quality"].perplexity / other["quality"].perplexity, 4),
            "size_ratio": round(m["size_mib"] / other["size_mib"], 4),
            "speedup_batch1": round(m["tokens_per_s_batch1"] / other["tokens_per_s_batch1"], 2),
            "speedup_batched": round(m["tokens_per_s_batched"] / other["tokens_per_s_batched"], 2)}
