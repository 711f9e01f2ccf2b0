"""The HTTP API: OpenAI-compatible chat completions and completions, models, health,
readiness and metrics.

    POST /v1/chat/completions   OpenAI's request and response (and its SSE chunks with stream)
    POST /v1/completions        OpenAI's legacy completions: a text prompt (serving/completions.py)
    POST /v1/feedback           a person's corrected answer for an answered request, stored beside
                                the request log (serving/feedback.py)
    GET  /v1/models             the version served, as ``name/version``
    GET  /health                200 while the process runs
    GET  /ready                 200 once a golden prompt produced a valid answer; 503 (with
                                the reason) before that, or when the engine failed or stalls,
                                or an upstream engine (serving/upstream.py) cannot be reached
    GET  /metrics               Prometheus: requests, latency, time to first token, tokens,
                                batch sizes, queue depth, rejections, cache, request log

Greedy answers are reused from the response cache; every request is appended to the
request log (serving/records.py).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the
status that says what went wrong (401 key, 404 model, 413 body, 400 prompt too long or a
response_format schema that is not one, 422 a field, 429 queue full or rate limit, 502 or
503 an upstream engine failing or unreachable, 504 timeout) and never a stack trace.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from components.lm import prompt_ids
from serving.engine import BaseEngine, Finished
from serving.model import ServedModel
from serving.protocol import ApiError, ChatRequest, check_schema, error_body, json_check
from serving.quota import Quota
from serving.records import RequestLog, ResponseCache, elapsed_ms, now_iso
from serving.settings import ServeSpec
from serving.shared import Metrics, Shared, check_quota, prompt_text, usage

GOLDEN_RETRY_S = 5.0  # a remote engine that failed the golden prompt is asked again this often


def golden_check(served: ServedModel, engine: BaseEngine, state: dict, timeout_s: float, constraint=None) -> bool:
    """Answer the version's golden example (the first validation chat) through the engine;
    ready only when the answer is valid under the task's answer schema. ``constraint``: the
    triage route's answer constraint, when the endpoint decodes triage answers under it (the
    golden answer is then decoded as /v1/triage would decode it). False when no answer came
    (worth asking again: a remote engine may come up)."""
    golden = served.manifest.get("golden")  # None: a version registered before golden examples
    messages = golden["messages"] if golden else [{"role": "user", "content": "ping"}]
    text = prompt_text(messages, served.tokenizer) if engine.remote else None
    try:
        done = engine.complete(prompt_ids(messages, served.tokenizer), max_tokens=64, timeout_s=timeout_s,
                               json_only=golden is not None, prompt=text,
                               constraint=constraint if golden is not None else None)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the endpoint is not ready and says why
        state.update(ready=False, reason=f"the golden prompt failed: {exc}", checked=True)
        return False
    errors = served.schema.errors(done.text) if golden else ([] if done.text else ["empty"])
    if errors:
        state.update(ready=False, reason=f"the golden prompt's answer is not valid: {'; '.join(errors)} "
                                         f"(answer: {done.text[:200]!r})", checked=True)
    else:
        state.update(ready=True, reason=None, golden_s=round(done.total_s, 3), checked=True)
    return True


def create_app(served: ServedModel, engine: BaseEngine, spec: ServeSpec, keys: dict[str, str] | None = None,
               log: RequestLog | None = None, triage=None, metrics: Metrics | None = None,
               quota: Quota | None = None) -> FastAPI:
    """The API around a loaded model and its running engine (in this process, or an
    upstream one: serving/upstream.py). ``keys``: key id -> secret; empty or None: no key
    needed. ``log``: where every request is recorded. On start-up the golden prompt is
    answered in the background: /ready says 503 until it is (a remote engine is asked again
    every few seconds until it answers it). ``metrics`` and ``quota``: shared with the other
    versions loaded in this process (serving/rollout.py); new ones when None. The golden
    check's outcome is ``app.state.readiness`` (``checked``, ``ready``, ``reason``)."""
    state: dict[str, Any] = {"ready": False, "reason": "the golden prompt has not been answered yet"}

    async def check_golden() -> None:
        constraint = getattr(triage, "constraint", None) if triage is not None and triage.constrain \
            and not engine.remote and triage.constraint_for == served.id else None
        while not await asyncio.to_thread(golden_check, served, engine, state, spec.limits.request_timeout_s,
                                          constraint) and engine.remote:
            await asyncio.sleep(GOLDEN_RETRY_S)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(check_golden())
        yield
        task.cancel()

    app = FastAPI(title="llmops endpoint", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = metrics or Metrics()
    cache = ResponseCache(spec.cache.max_entries, spec.cache.ttl_s)
    quota = quota or Quota(spec.rate_limits.requests_per_minute, spec.rate_limits.tokens_per_minute)
    app.state.readiness = state
    engine.on_batch = lambda size, seconds: metrics.batch.observe(size)
    shared = Shared(served, engine, spec, metrics, cache, quota, log)
    names = shared.names

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
                    check_quota(quota.admit(request.state.caller), request.state.caller)
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
        reasons = [await asyncio.to_thread(engine.problem, spec.limits.request_timeout_s) or
                   (None if state["ready"] else state["reason"]),
                   await asyncio.to_thread(triage.unavailable) if triage is not None else None]
        reason = "; ".join(r for r in reasons if r)
        body = {"status": "not ready" if reason else "ready", "model": served.id, "variant": served.variant}
        if reason:
            return JSONResponse(body | {"reason": reason}, 503)
        return body

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.set(engine.pending)
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
        shared.check_model(body.model)
        messages = [m.model_dump() for m in body.messages]
        ids, text = shared.prompt(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or spec.limits.default_max_tokens
        shared.check_max_tokens(max_tokens)
        shared.check_prompt(ids, request.state.caller, "messages")
        wants_json = body.response_format is not None and body.response_format.type != "text"
        if wants_json:
            check_schema(body.response_format)  # before any work: a bad schema is the request's fault
        started, completion_id, created = time.perf_counter(), f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        gen = shared.start(ids, max_tokens, body.temperature, body.top_p, body.stops, wants_json, text=text)
        record = {"request_id": completion_id, "route": "/v1/chat/completions", "messages": messages}
        fingerprint = f"{served.id}:{served.variant}"

        def finished(done: Finished | None, status: int = 200, error: str | None = None) -> dict | None:
            """Cache, count and log a request's outcome; the JSON check for JSON answers."""
            check = json_check(done.text, body.response_format, served.schema) if done and wants_json else None
            shared.outcome(gen, request, record | {"valid": check["valid"] if check else None}, started,
                           body.stream, done, status, error)
            return check

        if body.stream:
            def chunk(text: str | None = None, finish: str | None = None, usage: dict | None = None,
                      delta: dict | None = None) -> dict:
                payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": served.id, "system_fingerprint": fingerprint,
                           "choices": [] if usage else [{"index": 0, "finish_reason": finish, "logprobs": None,
                                                         "delta": delta or ({} if text is None else
                                                                            {"content": text})}]}
                return payload | ({"usage": usage} if usage else {})

            return await shared.stream(gen, chunk, finished, body.include_usage,
                                       opening=chunk(delta={"role": "assistant", "content": ""}))
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
                    "usage": usage(done), "system_fingerprint": fingerprint}
        if check is not None:
            response["llmops"] = check
        return response

    from serving.completions import add_route as add_completions
    from serving.feedback import add_route as add_feedback

    add_completions(app, shared)
    add_feedback(app, shared)
    if triage is not None:
        from serving.triage import add_route

        add_route(app, shared, triage)
    return app


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
