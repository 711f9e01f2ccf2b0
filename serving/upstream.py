"""The upstream engine: generation by an external OpenAI-compatible server (vLLM, a KServe
Hugging Face runtime, or another `llmops serve`), behind the same interface as the
in-process engine (serving/engine.py), so that every route, the response cache, the
request log, keys, limits and metrics stay in this process, the gateway.

Each request goes to the upstream's ``POST <url>/completions`` (OpenAI's legacy
completions) with the prompt as text: the text of the chat template that built the
request's token ids here, so the upstream sees the prompt training used. It streams (SSE
chunks, ``data: [DONE]`` at the end); every piece goes back to the route as a ``delta``
event, and the token counts come from the upstream's ``usage`` (counted here with the
version's tokenizer when the upstream sends none, or when a JSON answer is cut where its
object closes). At most ``max_concurrent`` requests are in flight; up to ``max_queue``
more wait, beyond that QueueFull (429).

Failures become refusals that name the upstream, never a stack trace: no connection 503,
the upstream at capacity (429/503) 503, no bytes within the read timeout 504, any other
error status or a malformed or broken stream 502. ``problem`` (for /ready) asks the
upstream's ``GET <url>/models`` at most every few seconds.

What cannot run upstream: decoding constrained to the task's answers (a logits processor
of the in-process engine). Triage answers are validated instead.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx

from components.task import object_end
from serving.engine import BaseEngine, Finished, QueueFull, Request
from serving.protocol import ApiError
from serving.settings import UpstreamSpec

HEALTH_TTL_S = 5.0  # how long an answer of the upstream's /models is trusted by /ready
HEALTH_TIMEOUT_S = 5.0  # the longest /ready waits for it


class UpstreamEngine(BaseEngine):
    remote = True

    def __init__(self, url: str, model: str, tokenizer, api_key: str | None = None, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 60.0, max_concurrent: int = 16, max_queue: int = 64):
        self.url, self.model, self.tokenizer = url.rstrip("/"), model, tokenizer
        self.where = f"the upstream engine at {self.url}"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(read_timeout_s, connect=connect_timeout_s)
        self.health_timeout = httpx.Timeout(min(read_timeout_s, HEALTH_TIMEOUT_S), connect=connect_timeout_s)
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.error: str | None = None  # the last failure (cleared by the next answer)
        self.on_batch = lambda size, seconds: None  # batches happen upstream: not seen here
        self._waiting = 0
        self._lock = threading.Lock()
        self._health: tuple[float, str | None] = (0.0, None)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmops-upstream", daemon=True)
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None

    @classmethod
    def from_spec(cls, spec: UpstreamSpec, model_id: str, tokenizer, max_queue: int) -> "UpstreamEngine":
        """The engine serve.upstream describes; ValueError (naming the key) when its API key's
        variable is not set."""
        key = None
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ValueError(f"serve.upstream.api_key_env: ${spec.api_key_env} is not set (the upstream's key)")
        return cls(spec.url, spec.model or model_id, tokenizer, key, spec.connect_timeout_s, spec.read_timeout_s,
                   spec.max_concurrent, max_queue)

    def start(self) -> "UpstreamEngine":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=30)
        return self

    async def _open(self) -> None:
        limits = httpx.Limits(max_connections=self.max_concurrent, max_keepalive_connections=self.max_concurrent)
        self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits, headers=self.headers)
        self._slots = asyncio.Semaphore(self.max_concurrent)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    @property
    def pending(self) -> int:
        return self._waiting

    def submit(self, request: Request) -> None:
        """Send ``request`` upstream once one of ``max_concurrent`` slots is free; QueueFull
        when ``max_queue`` requests already wait for one."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting for {self.where}")
            self._waiting += 1
        asyncio.run_coroutine_threadsafe(self._generate(request), self._loop)

    def problem(self, stall_s: float) -> str | None:
        """Why the upstream cannot answer now (None: it can); asked at most every few seconds."""
        if not self.alive:
            return "the upstream engine's thread stopped"
        checked, reason = self._health
        if time.monotonic() - checked > HEALTH_TTL_S:
            reason = self._probe()
            self._health = (time.monotonic(), reason)
        return reason

    def _probe(self) -> str | None:
        try:
            r = httpx.get(f"{self.url}/models", headers=self.headers, timeout=self.health_timeout)
        except httpx.TransportError as exc:
            return f"{self.where} is unreachable: {_reason(exc)}"
        if r.status_code != 200:
            return f"{self.where} answers {self.url}/models with HTTP {r.status_code}: {_message(r.content)}"
        try:
            served = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            return f"{self.where}: {self.url}/models is not an OpenAI model list"
        if self.model not in served:
            return (f"{self.where} does not serve {self.model!r} (it serves {', '.join(served) or 'nothing'}); "
                    "see serve.upstream.model")
        return None

    async def _generate(self, request: Request) -> None:
        try:
            async with self._slots:
                with self._lock:
                    self._waiting -= 1
                if request.cancelled.is_set():
                    return
                done = await self._stream(request, time.perf_counter())
        except ApiError as exc:
            self.error = exc.message
            request.emit(("error", exc))
            return
        except Exception as exc:  # noqa: BLE001 - whatever else failed, the request gets an answer
            self.error = f"{type(exc).__name__}: {exc}"
            request.emit(("error", ApiError(502, f"{self.where}: the request failed ({self.error})",
                                            kind="server_error", code="upstream_error")))
            return
        self.error = None
        request.emit(("done", done))

    async def _stream(self, request: Request, sent_at: float) -> Finished:
        prompt = request.prompt if request.prompt is not None else self.tokenizer.decode(request.prompt_ids)
        body = {"model": self.model, "prompt": prompt, "max_tokens": request.max_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "stream": True,
                "stream_options": {"include_usage": True}} | ({"stop": request.stop} if request.stop else {})
        text, sent, finish, counts, first, ended = "", 0, None, None, None, False
        try:
            async with self._client.stream("POST", f"{self.url}/completions", json=body) as response:
                if response.status_code != 200:
                    raise self._refusal(response.status_code, await response.aread(), response.headers)
                async for line in response.aiter_lines():
                    if request.cancelled.is_set():
                        finish = "cancelled"
                        break
                    if not line.startswith("data:"):
                        continue  # blank lines, comments, event names
                    data = line[5:].strip()
                    if data == "[DONE]":
                        ended = True
                        break
                    piece, reason, counts = self._chunk(data, counts)
                    finish = reason or finish
                    if piece:
                        first = first or time.perf_counter()
                        text += piece
                        end = object_end(text) if request.json_only else None
                        if end is not None:  # a JSON answer ends where its object closes
                            text, finish, ended, counts = text[:end], "stop", True, None
                        if len(text) > sent:
                            request.emit(("delta", text[sent:]))
                            sent = len(text)
                        if end is not None:
                            break  # leaving the stream closes it: the upstream stops generating
        except httpx.ConnectError as exc:
            raise ApiError(503, f"{self.where} is unreachable: {_reason(exc)}", kind="service_unavailable",
                           code="upstream_unreachable", headers={"Retry-After": "5"}) from None
        except httpx.TimeoutException as exc:
            raise ApiError(504, f"{self.where} did not answer in time ({type(exc).__name__}; "
                                "serve.upstream.connect_timeout_s, read_timeout_s)", kind="timeout_error",
                           code="upstream_timeout") from None
        except httpx.TransportError as exc:
            raise self._malformed(f"the connection broke ({_reason(exc)})") from None
        if not ended and finish != "cancelled":
            raise self._malformed("the stream ended before data: [DONE]")
        done_at = time.perf_counter()
        prompt_tokens = counts["prompt_tokens"] if counts else len(request.prompt_ids)
        completion_tokens = (counts["completion_tokens"] if counts else
                             len(self.tokenizer(text, add_special_tokens=False).input_ids))
        return Finished(text=text, finish_reason=finish or "stop", prompt_tokens=prompt_tokens,
                        completion_tokens=completion_tokens, queued_s=sent_at - request.submitted,
                        first_token_s=first - request.submitted if first else None,
                        total_s=done_at - request.submitted, batch_size=None)

    def _chunk(self, data: str, counts: dict | None) -> tuple[str, str | None, dict | None]:
        """(text, finish_reason, usage so far) of one SSE chunk; 502 when it is not one."""
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise self._malformed(f"a chunk is not JSON ({data[:80]!r})") from None
        if not isinstance(chunk, dict):
            raise self._malformed(f"a chunk is not a JSON object ({data[:80]!r})")
        if "error" in chunk:
            raise ApiError(502, f"{self.where} failed mid-answer: {_message(data.encode())}", kind="server_error",
                           code="upstream_error")
        found = chunk.get("usage")
        if isinstance(found, dict) and all(isinstance(found.get(k), int) for k in ("prompt_tokens",
                                                                                   "completion_tokens")):
            counts = found
        choices = chunk.get("choices") or []
        if not choices:
            return "", None, counts
        choice = choices[0]
        piece = choice.get("text") if isinstance(choice, dict) else None
        if not isinstance(piece, str):
            raise self._malformed(f"a chunk has no choices[0].text ({data[:80]!r}); is it a completions endpoint?")
        return piece, choice.get("finish_reason"), counts

    def _refusal(self, status: int, content: bytes, headers) -> ApiError:
        said = f"{self.where} answered HTTP {status}: {_message(content)}"
        if status in (429, 503):
            return ApiError(503, f"{said}; retry later", kind="service_unavailable", code="upstream_busy",
                            headers={"Retry-After": headers.get("retry-after", "5")})
        hint = {401: "; check serve.upstream.api_key_env", 403: "; check serve.upstream.api_key_env",
                404: "; check serve.upstream.url and serve.upstream.model"}.get(status, "")
        return ApiError(502, said + hint, kind="server_error", code="upstream_error")

    def _malformed(self, what: str) -> ApiError:
        return ApiError(502, f"{self.where} sent a malformed answer: {what}", kind="server_error",
                        code="upstream_malformed")


def _message(content: bytes) -> str:
    """The message of an error body (OpenAI's, vLLM's or plain text), shortened."""
    text = content.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text[:200] or "(empty body)"
    error = body.get("error", body) if isinstance(body, dict) else body
    found = error.get("message") or error.get("detail") if isinstance(error, dict) else error
    return str(found if found else text)[:200]


def _reason(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
