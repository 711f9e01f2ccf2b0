"""What the routes share: the served version and its engine, limits, metrics, the response
cache, quota and request log (``Shared``), and OpenAI's server-sent events, which chat
completions and completions stream the same way with chunks of their own shape."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from components.lm import prompt_ids
from serving.engine import BaseEngine, Finished, QueueFull, Request
from serving.model import ServedModel
from serving.protocol import ApiError, error_body
from serving.quota import Quota
from serving.records import RequestLog, ResponseCache, elapsed_ms, now_iso
from serving.settings import ServeSpec

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


def metrics_in_memory() -> None:
    """Keep metric values in this process's memory. Importing Feast sets
    PROMETHEUS_MULTIPROC_DIR, which turns prometheus_client's values into files shared by
    every metric of the same name in the process (and leaves a folder in /tmp): two apps in
    one process (tests, a hot swap) would then count each other's requests."""
    from prometheus_client import values

    values.ValueClass = values.MutexValue


class Metrics:
    """The endpoint's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        metrics_in_memory()
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmops_requests", "Requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("llmops_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("llmops_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llmops_generated_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("llmops_prompt_tokens", "Prompt tokens", registry=r)
        self.batch = Histogram("llmops_batch_size", "Requests generated together", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)
        self.queue = Gauge("llmops_queue_depth", "Requests waiting for the engine", registry=r)
        self.rejected = Counter("llmops_rejected", "Requests refused before generation, by reason", ["reason"],
                                registry=r)
        self.cache = Counter("llmops_cache", "Response cache lookups of greedy requests", ["result"], registry=r)
        self.cache_size = Gauge("llmops_cache_entries", "Answers in the response cache", registry=r)
        self.log_written = Gauge("llmops_request_log_written", "Request records written", registry=r)
        self.log_dropped = Gauge("llmops_request_log_dropped", "Request records dropped (queue full or disk "
                                                               "error)", registry=r)
        self.log_uploads = Gauge("llmops_request_log_uploads", "Request log uploads to S3 by result", ["result"],
                                 registry=r)
        self.feedback = Counter("llmops_feedback_records", "Feedback records: stored, or refused (invalid_answer, "
                                                           "not_stored)", ["result"], registry=r)


def prompt_text(messages: list[dict], tokenizer) -> str:
    """The prompt ``prompt_ids`` tokenizes, as text (what an upstream engine is sent, and
    tokenizes back to the same ids). A leading BOS that the tokenizer adds by itself is left
    out: the upstream adds it when it tokenizes."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


@dataclass
class Generation:
    """One request's generation: from the cache (``hit``) or the engine (``job``), its events."""
    job: Request
    events: asyncio.Queue
    hit: Finished | None
    key: str | None


@dataclass
class Shared:
    """What the routes share: the model and its engine, the limits, metrics, response cache,
    quota and request log."""
    served: ServedModel
    engine: BaseEngine
    spec: ServeSpec
    metrics: Metrics
    cache: ResponseCache
    quota: Quota
    log: RequestLog | None

    @property
    def names(self) -> set[str]:
        """What requests may call the model: its id, name, name/version, name@alias."""
        served = self.served
        return {served.id, served.name, f"{served.name}/{served.version}"} | (
            {f"{served.name}@{served.alias}"} if served.alias else set())

    def check_model(self, model: str) -> None:
        if model not in self.names:
            others = ", ".join(sorted(self.names - {self.served.id}))
            raise ApiError(404, f"model {model!r} is not served here; this endpoint serves {self.served.id} "
                                f"(also as {others})", param="model", code="model_not_found")

    def check_max_tokens(self, max_tokens: int) -> None:
        if max_tokens > self.spec.limits.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds the limit of {self.spec.limits.max_tokens} "
                                "(serve.limits.max_tokens)", param="max_tokens", code="max_tokens_too_large")

    def check_prompt(self, ids: list[int], caller: str, param: str) -> None:
        """400 for a prompt over the token limit; 429 over the caller's token quota."""
        if len(ids) > self.spec.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the limit is {self.spec.limits.max_prompt_tokens} "
                                "(serve.limits.max_prompt_tokens)", param=param, code="prompt_too_long")
        try:
            check_quota(self.quota.admit_tokens(caller, len(ids)), caller)
        except ApiError:
            self.metrics.rejected.labels("rate_limited").inc()
            raise

    def prompt(self, messages: list[dict]) -> tuple[list[int], str | None]:
        """The chat's prompt as training builds it: token ids, and the text when the engine
        is remote (None otherwise)."""
        tokenizer = self.served.tokenizer
        return prompt_ids(messages, tokenizer), prompt_text(messages, tokenizer) if self.engine.remote else None

    def start(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
              stop: list[str] | None = None, json_only: bool = False, constraint=None,
              text: str | None = None) -> Generation:
        """Answer from the cache (greedy requests), or queue the request (429 when full).
        ``constraint``: decoding limited to the task's answers (serving/constrain.py);
        ``text``: the prompt as text (what a remote engine is sent)."""
        stop = stop or []
        mode = "answers" if constraint is not None else json_only
        key = ResponseCache.key(self.served.id, ids, max_tokens, stop, mode) if temperature == 0 else None
        hit = self.cache.get(key) if key is not None else None
        if key is not None and self.cache.enabled:
            self.metrics.cache.labels("hit" if hit else "miss").inc()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Request(ids, max_tokens, temperature, top_p, stop,
                      emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event), json_only=json_only,
                      constraint=constraint, prompt=text)
        if hit is not None:  # answered before: the same events, without the engine
            events.put_nowait(("delta", hit.text))
            events.put_nowait(("done", replace(hit, queued_s=0.0, first_token_s=0.0, total_s=0.0, batch_size=0)))
        else:
            try:
                self.engine.submit(job)
            except QueueFull as exc:
                self.metrics.rejected.labels("queue_full").inc()
                raise ApiError(429, f"the endpoint is at capacity: {exc}; retry later", kind="rate_limit_error",
                               code="queue_full", headers={"Retry-After": str(self.spec.batching.retry_after_s)}
                               ) from None
        return Generation(job, events, hit, key)

    async def wait(self, gen: Generation) -> Finished:
        """The finished answer; 504 after ``limits.request_timeout_s`` (the request is dropped)."""
        timeout_s = self.spec.limits.request_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    kind, value = await gen.events.get()
                    if kind == "done":
                        return value
                    if kind == "error":
                        raise failure(value)
        except TimeoutError:
            gen.job.cancelled.set()
            raise timed_out(timeout_s) from None

    async def stream(self, gen: Generation, chunk: Callable[..., dict], finished: Callable, include_usage: bool,
                     opening: dict | None = None) -> StreamingResponse:
        """The answer as server-sent events (see ``sse``), once its first event is in: a
        request that fails before its first piece (an upstream that is down, a timeout) gets
        its error status instead of a 200 stream that carries the error."""
        timeout_s = self.spec.limits.request_timeout_s
        try:
            first = await asyncio.wait_for(gen.events.get(), timeout=timeout_s)
        except TimeoutError:
            gen.job.cancelled.set()
            first = ("error", timed_out(timeout_s))
        if first[0] == "error":
            err = failure(first[1])
            finished(None, err.status, err.message)
            raise err
        return StreamingResponse(sse(gen, first, timeout_s, chunk, finished, include_usage, opening),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def settle(self, gen: Generation, done: Finished, caller: str) -> None:
        """Count a finished generation, charge the caller's quota, keep a finished answer."""
        if gen.hit is not None:
            return
        self.metrics.tokens.inc(done.completion_tokens)
        self.metrics.prompt_tokens.inc(done.prompt_tokens)
        if done.first_token_s is not None:
            self.metrics.ttft.observe(done.first_token_s)
        self.quota.spend(caller, done.prompt_tokens + done.completion_tokens)
        if gen.key is not None and done.finish_reason in ("stop", "length"):  # never a cut-off answer
            self.cache.put(gen.key, done)

    def outcome(self, gen: Generation, request: HttpRequest, record: dict, started: float, stream: bool,
                done: Finished | None, status: int = 200, error: str | None = None) -> None:
        """Settle a finished generation, observe a stream's latency (at its end) and log the
        request: ``record`` (its id, route, prompt) with the outcome."""
        if stream:
            self.metrics.latency.labels(record["route"]).observe(time.perf_counter() - started)
        if done is not None:
            self.settle(gen, done, request.state.caller)
        if self.log is not None:
            self.log.append(record | {
                "time": now_iso(), "key_id": getattr(request.state, "key_id", None), "model": self.served.id,
                "variant": self.served.variant, "prompt_tokens": len(gen.job.prompt_ids),
                "answer": done.text if done else None, "completion_tokens": done.completion_tokens if done else 0,
                "finish_reason": done.finish_reason if done else None, "stream": stream, "cached": gen.hit is not None,
                "batch_size": done.batch_size if done else None,
                "ttft_ms": round(1000 * done.first_token_s, 1) if done and done.first_token_s else None,
                "latency_ms": elapsed_ms(started), "status": status, "error": error})


def check_quota(over: tuple[str, int] | None, caller: str) -> None:
    if over is not None:
        what, retry_after = over
        raise ApiError(429, f"rate limit of {what} reached for {caller}; retry in {retry_after} s "
                            "(serve.rate_limits)", kind="rate_limit_error", code="rate_limited",
                       headers={"Retry-After": str(retry_after)})


def timed_out(timeout_s: float) -> ApiError:
    return ApiError(504, f"no answer within {timeout_s:.0f} s (serve.limits.request_timeout_s)",
                    kind="timeout_error", code="timeout")


def failure(value: Any) -> ApiError:
    """An engine's error event as the refusal a client gets: a remote engine says its own
    status (502, 503, 504); the in-process engine's failures are 500."""
    if isinstance(value, ApiError):
        return value
    return ApiError(500, f"generation failed: {value}", kind="server_error", code="engine_error")


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def sse(gen: Generation, first: tuple, timeout_s: float, chunk: Callable[..., dict], finished: Callable,
              include_usage: bool, opening: dict | None = None):
    """OpenAI's chunks as server-sent events: ``opening`` (if any), ``chunk(text=...)`` per
    piece of the answer (from the ``first`` event on), ``chunk(finish=...)``,
    ``chunk(usage=...)`` when asked, then ``data: [DONE]``; a failure, or no answer within
    ``timeout_s`` of the request, ends the stream with an error object. A client that goes
    away cancels its request (the engine drops it)."""
    def data(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    if opening is not None:
        yield data(opening)
    event: tuple | None = first
    deadline = gen.job.submitted + timeout_s
    try:
        while True:
            try:
                kind, value = event or await asyncio.wait_for(gen.events.get(),
                                                              timeout=max(0.01, deadline - time.perf_counter()))
            except TimeoutError:
                gen.job.cancelled.set()
                kind, value = "error", timed_out(timeout_s)
            event = None
            if kind == "delta":
                yield data(chunk(text=value))
            elif kind == "error":
                err = failure(value)
                finished(None, err.status, err.message)
                yield data(error_body(err.message, err.kind, code=err.code))
                return
            else:
                finished(value)
                yield data(chunk(finish=value.finish_reason))
                if include_usage:
                    yield data(chunk(usage=usage(value)))
                yield "data: [DONE]\n\n"
                return
    finally:
        gen.job.cancelled.set()  # no-op when finished; drops the request when the client left
