"""The HTTP API: OpenAI-compatible chat completions, models, health, readiness and metrics.

    POST /v1/chat/completions   OpenAI's request and response (and its SSE chunks with stream)
    GET  /v1/models             the version served, as ``name/version``
    GET  /health                200 while the process runs
    GET  /ready                 200 once a golden prompt produced a valid answer; 503 (with
                                the reason) before that, or when the engine failed or stalls
    GET  /metrics               Prometheus: requests, latency, time to first token, tokens,
                                batch sizes, queue depth, rejections, cache, request log

Greedy answers are reused from the response cache; every chat request is appended to the
request log (serving/records.py).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status that says what went wrong (401 key, 404 model, 413 body, 400 prompt too long or a
response_format schema that is not one, 422 a field, 429 queue full or rate limit, 504
timeout) and never a stack trace.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from components.lm import prompt_ids
from serving.engine import Engine, Finished, QueueFull, Request
from serving.model import ServedModel
from serving.protocol import ApiError, ChatRequest, check_schema, error_body, json_check
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


def golden_check(served: ServedModel, engine: Engine, state: dict, timeout_s: float) -> None:
    """Answer the version's golden example (the first validation chat) through the engine;
    ready only when the answer is valid under the task's answer schema."""
    golden = served.manifest.get("golden")  # None: a version registered before golden examples
    messages = golden["messages"] if golden else [{"role": "user", "content": "ping"}]
    try:
        done = engine.complete(prompt_ids(messages, served.tokenizer), max_tokens=64, timeout_s=timeout_s,
                               json_only=golden is not None)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the endpoint is not ready and says why
        state.update(ready=False, reason=f"the golden prompt failed: {exc}")
        return
    errors = served.schema.errors(done.text) if golden else ([] if done.text else ["empty"])
    if errors:
        state.update(ready=False, reason=f"the golden prompt's answer is not valid: {'; '.join(errors)} "
                                         f"(answer: {done.text[:200]!r})")
    else:
        state.update(ready=True, reason=None, golden_s=round(done.total_s, 3))


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
    engine: Engine
    spec: ServeSpec
    metrics: Metrics
    cache: ResponseCache
    quota: Quota
    log: RequestLog | None

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
            _check_quota(self.quota.admit_tokens(caller, len(ids)), caller)
        except ApiError:
            self.metrics.rejected.labels("rate_limited").inc()
            raise

    def start(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
              stop: list[str] | None = None, json_only: bool = False, constraint=None) -> Generation:
        """Answer from the cache (greedy requests), or queue the request (429 when full).
        ``constraint``: decoding limited to the task's answers (serving/constrain.py)."""
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
                      constraint=constraint)
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
        return await _wait(gen.job, gen.events, self.spec.limits.request_timeout_s)

    def settle(self, gen: Generation, done: Finished, caller: str) -> None:
        """Count a finished generation, charge the caller's quota, keep a finished answer."""
        if gen.hit is not None:
            return
        _observe(self.metrics, done)
        self.quota.spend(caller, done.prompt_tokens + done.completion_tokens)
        if gen.key is not None and done.finish_reason in ("stop", "length"):  # never a cut-off answer
            self.cache.put(gen.key, done)


def create_app(served: ServedModel, engine: Engine, spec: ServeSpec, keys: dict[str, str] | None = None,
               log: RequestLog | None = None, triage=None) -> FastAPI:
    """The API around a loaded model and its running engine. ``keys``: key id -> secret;
    empty or None: no key needed. ``log``: where every chat request is recorded. On start-up
    the golden prompt is answered in the background: /ready says 503 until it is."""
    state: dict[str, Any] = {"ready": False, "reason": "the golden prompt has not been answered yet"}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(asyncio.to_thread(golden_check, served, engine, state,
                                                     spec.limits.request_timeout_s))
        yield
        task.cancel()

    app = FastAPI(title="llmops endpoint", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = Metrics()
    cache = ResponseCache(spec.cache.max_entries, spec.cache.ttl_s)
    quota = Quota(spec.rate_limits.requests_per_minute, spec.rate_limits.tokens_per_minute)
    engine.on_batch = lambda size, seconds: metrics.batch.observe(size)
    shared = Shared(served, engine, spec, metrics, cache, quota, log)
    names = {served.id, served.name, f"{served.name}/{served.version}"}
    if served.alias:
        names.add(f"{served.name}@{served.alias}")

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(error_body(message, "invalid_request_error", param), 422)

    @app.exception_handler(Exception)
    async def _crash(request: HttpRequest, exc: Exception):  # never a stack trace to a client
        return JSONResponse(error_body(f"internal error ({type(exc).__name__}); see the server log",
                                        "server_error"), 500)

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):
        started = time.perf_counter()
        route = request.url.path
        if route.startswith("/v1/"):
            try:
                _check_key(request, keys)
                request.state.caller = (getattr(request.state, "key_id", None)
                                        or f"ip:{request.client.host if request.client else 'unknown'}")
                if request.method == "POST":
                    _check_quota(quota.admit(request.state.caller), request.state.caller)
                length = int(request.headers.get("content-length") or 0)
                if length > spec.limits.max_body_bytes:
                    raise ApiError(413, f"request body of {length} bytes exceeds the limit of "
                                        f"{spec.limits.max_body_bytes} (serve.limits.max_body_bytes)",
                                   code="body_too_large")
            except ApiError as exc:
                metrics.requests.labels(route, str(exc.status)).inc()
                metrics.rejected.labels(exc.code or str(exc.status)).inc()
                if log is not None:  # refusals count in monitoring (rate-limited share, errors)
                    log.append({"request_id": None, "time": now_iso(), "route": route,
                                "key_id": getattr(request.state, "key_id", None), "model": served.id,
                                "variant": served.variant, "status": exc.status, "error": exc.message,
                                "rejected": exc.code, "latency_ms": elapsed_ms(started)})
                return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), exc.status,
                                    headers=exc.headers)
        response = await call_next(request)
        if route not in ("/metrics", "/health"):
            metrics.requests.labels(route, str(response.status_code)).inc()
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                metrics.latency.labels(route).observe(time.perf_counter() - started)  # a stream's: at its end
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        reasons = [not_ready_reason(engine, state, spec.limits.request_timeout_s),
                   await asyncio.to_thread(triage.unavailable) if triage is not None else None]
        reason = "; ".join(r for r in reasons if r)
        body = {"status": "not ready" if reason else "ready", "model": served.id, "variant": served.variant}
        if reason:
            return JSONResponse(body | {"reason": reason}, 503)
        return body

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.set(engine.queue.qsize())
        metrics.cache_size.set(len(cache))
        if log is not None:
            metrics.log_written.set(log.written)
            metrics.log_dropped.set(log.dropped)
            if log.shipper is not None:
                metrics.log_uploads.labels("ok").set(log.shipper.uploaded)
                metrics.log_uploads.labels("error").set(log.shipper.errors)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.id, "object": "model", "created": int(served.loaded_at),
                                            "owned_by": "llmops", "variant": served.variant,
                                            "aliases": sorted(names - {served.id})}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HttpRequest):
        if body.model not in names:
            raise ApiError(404, f"model {body.model!r} is not served here; this endpoint serves {served.id} "
                                f"(also as {', '.join(sorted(names - {served.id}))})", param="model",
                           code="model_not_found")
        ids = prompt_ids([m.model_dump() for m in body.messages], served.tokenizer)
        max_tokens = body.max_completion_tokens or body.max_tokens or spec.limits.default_max_tokens
        shared.check_max_tokens(max_tokens)
        shared.check_prompt(ids, request.state.caller, "messages")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        wants_json = body.response_format is not None and body.response_format.type != "text"
        if wants_json:
            check_schema(body.response_format)  # before any work: a bad schema is the request's fault
        started, completion_id, created = time.perf_counter(), f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        gen = shared.start(ids, max_tokens, body.temperature, body.top_p, stop, wants_json)
        job, events, hit = gen.job, gen.events, gen.hit

        def finished(done: Finished | None, status: int = 200, error: str | None = None) -> dict | None:
            """Cache, count and log a request's outcome; the JSON check for JSON answers."""
            check = json_check(done.text, body.response_format, served.schema) if done and wants_json else None
            if body.stream:
                metrics.latency.labels("/v1/chat/completions").observe(time.perf_counter() - started)
            if done is not None:
                shared.settle(gen, done, request.state.caller)
            if log is not None:
                log.append({"request_id": completion_id, "time": now_iso(), "route": "/v1/chat/completions",
                            "key_id": getattr(request.state, "key_id", None), "model": served.id,
                            "variant": served.variant, "messages": [m.model_dump() for m in body.messages],
                            "prompt_tokens": len(ids), "answer": done.text if done else None,
                            "completion_tokens": done.completion_tokens if done else 0,
                            "finish_reason": done.finish_reason if done else None,
                            "valid": check["valid"] if check else None, "stream": body.stream,
                            "cached": hit is not None, "batch_size": done.batch_size if done else None,
                            "ttft_ms": round(1000 * done.first_token_s, 1) if done and done.first_token_s else None,
                            "latency_ms": elapsed_ms(started), "status": status, "error": error})
            return check

        if body.stream:
            return StreamingResponse(_stream(job, events, completion_id, created, body, served, spec, finished),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            done = await shared.wait(gen)
        except ApiError as exc:
            finished(None, exc.status, exc.message)
            raise
        check = finished(done)
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        response = {"id": completion_id, "object": "chat.completion", "created": created, "model": served.id,
                    "choices": [{"index": 0, "message": message, "finish_reason": done.finish_reason,
                                 "logprobs": None}],
                    "usage": _usage(done), "system_fingerprint": f"{served.id}:{served.variant}"}
        if check is not None:
            response["llmops"] = check
        return response

    if triage is not None:
        from serving.triage import add_route

        add_route(app, shared, triage)
    return app


def not_ready_reason(engine: Engine, state: dict, stall_s: float) -> str | None:
    """Why the endpoint should not take traffic now (None: it should)."""
    if not engine.alive:
        return "the engine thread stopped"
    if engine.error:
        return f"the engine's last batch failed: {engine.error}"
    if engine.busy_since is not None and time.perf_counter() - engine.busy_since > stall_s:
        return f"the engine has been on one batch for more than {stall_s:.0f} s"
    if not state["ready"]:
        return state["reason"]
    return None


def _check_key(request: HttpRequest, keys: dict[str, str] | None) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not given:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", kind="authentication_error",
                       code="missing_api_key")
    matched = [key_id for key_id, secret in keys.items() if hmac.compare_digest(given.encode(), secret.encode())]
    if not matched:
        raise ApiError(401, "invalid API key", kind="authentication_error", code="invalid_api_key")
    request.state.key_id = matched[0]


def _check_quota(over: tuple[str, int] | None, caller: str) -> None:
    if over is not None:
        what, retry_after = over
        raise ApiError(429, f"rate limit of {what} reached for {caller}; retry in {retry_after} s "
                            "(serve.rate_limits)", kind="rate_limit_error", code="rate_limited",
                       headers={"Retry-After": str(retry_after)})


async def _wait(job: Request, events: asyncio.Queue, timeout_s: float) -> Finished:
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                kind, value = await events.get()
                if kind == "done":
                    return value
                if kind == "error":
                    raise ApiError(500, f"generation failed: {value}", kind="server_error", code="engine_error")
    except TimeoutError:
        job.cancelled.set()
        raise ApiError(504, f"no answer within {timeout_s:.0f} s (serve.limits.request_timeout_s)",
                       kind="timeout_error", code="timeout") from None


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _observe(metrics: Metrics, done: Finished) -> None:
    metrics.tokens.inc(done.completion_tokens)
    metrics.prompt_tokens.inc(done.prompt_tokens)
    if done.first_token_s is not None:
        metrics.ttft.observe(done.first_token_s)


async def _stream(job: Request, events: asyncio.Queue, completion_id: str, created: int, body: ChatRequest,
                  served: ServedModel, spec: ServeSpec, finished: Callable):
    """OpenAI's chunks as server-sent events, then ``data: [DONE]``. A client that goes away
    cancels its request (the engine drops the row at the next step)."""
    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": served.id,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                   if usage is None else [], "system_fingerprint": f"{served.id}:{served.variant}"}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    deadline = time.perf_counter() + spec.limits.request_timeout_s
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=max(0.01, deadline - time.perf_counter()))
            except TimeoutError:
                job.cancelled.set()
                message = f"no answer within {spec.limits.request_timeout_s:.0f} s"
                finished(None, 504, message)
                yield f"data: {json.dumps(error_body(message, 'timeout_error', code='timeout'))}\n\n"
                return
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "error":
                finished(None, 500, f"generation failed: {value}")
                yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
                return
            else:
                finished(value)
                yield chunk({}, value.finish_reason)
                if body.stream_options and body.stream_options.include_usage:
                    yield chunk({}, usage=_usage(value))
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled.set()  # no-op when finished; drops the row when the client left
