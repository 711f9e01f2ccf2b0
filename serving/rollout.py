"""Versions side by side in one endpoint: the live version answers; a candidate is loaded
beside it, checked, optionally given a copy (shadow) or a share (canary) of the live
requests, and then made live in one step or discarded. The deploy stage
(components/deploy/local.py) drives it through the admin routes below.

    GET    /admin/status        the live version (since when), the candidate, the routing mode,
                                the last events (loaded, switched, discarded, unloaded)
    POST   /admin/candidate     {"model": "name/3", "weights": "serving", "alias": "champion"}: load
                                it beside the live
                                one and answer its golden prompt; 422 with the reason (and nothing
                                kept) when the files, the hashes or the golden answer are wrong
    DELETE /admin/candidate     unload the candidate (live traffic never noticed it)
    POST   /admin/route         {"mode": "none" | "shadow" | "canary", "share": 0.1}: what live
                                traffic the candidate sees; observations start afresh
    GET    /admin/observations  per request: both answers (shadow) or each arm's outcome (canary)
    POST   /admin/switch        {"model": "name/3"}: the candidate becomes live at once; the old
                                version finishes the requests it holds, then is unloaded

A request with ``X-LLMOps-Target: candidate`` (admin-authorised) is answered by the
candidate: how the deploy stage sends its smoke set, with ``X-LLMOps-Probe: smoke`` (also on
a smoke set sent to the live version) so those requests are logged as ``"smoke": true`` and
skipped by monitoring, like shadow copies. Every answer carries
``X-LLMOps-Model: name/version``, the version that produced it.

Admin calls need the key in ``serve.admin_key_env``, as ``Authorization: Bearer <key>`` or
``X-LLMOps-Admin-Key: <key>`` (the latter beside a request's own API key, for requests to
the candidate); without that variable they are accepted from this machine (127.0.0.1) only.

Shadow copies are answered after the live answer went out, cost the caller no quota, and
are logged with ``"shadow": true`` (monitoring skips them). The switch is one assignment
in the event loop: a request is routed either before it (old version) or after it (new);
none is dropped.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from serving.protocol import error_body
from serving.records import SYNTHETIC

ANSWER_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/triage")
TARGET_HEADER, MODEL_HEADER, ADMIN_HEADER = b"x-llmops-target", b"x-llmops-model", b"x-llmops-admin-key"
PROBE_HEADER = b"x-llmops-probe"  # "smoke": a deploy's smoke request (logged as such, no quota)
MAX_OBSERVATIONS = 20_000
MAX_CAPTURE = 1 << 20  # bytes of an answer kept to judge it


class Lifespan:
    """An ASGI app's lifespan (start-up and shut-down) run by hand, for apps mounted behind
    the switchboard instead of directly under the server."""

    def __init__(self, app) -> None:
        self.app, self._to_app, self._from_app = app, asyncio.Queue(), asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                                 self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        message = await self._from_app.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"start-up failed: {message.get('message', message['type'])}")

    async def stop(self) -> None:
        if self._task is None or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._from_app.get()


@dataclass
class Slot:
    """One loaded version: its app (routes, engine, cache) and what releases it."""
    served: Any  # serving.model.ServedModel
    engine: Any  # serving.engine.BaseEngine
    app: Any  # FastAPI
    inflight: int = 0
    since: float = field(default_factory=time.time)
    lifespan: Lifespan | None = None

    @property
    def id(self) -> str:
        return self.served.id

    def info(self) -> dict:
        readiness = getattr(self.app.state, "readiness", {})
        return {"model": self.served.id, "variant": self.served.variant, "since": _iso(self.since),
                "load_s": self.served.load_s, "ready": bool(readiness.get("ready")),
                "reason": readiness.get("reason"), "golden_s": readiness.get("golden_s"), "inflight": self.inflight}


@dataclass
class Outcome:
    """What one slot answered to one request."""
    model: str
    status: int = 0
    latency_ms: float = 0.0
    text: str | None = None
    valid: bool | None = None
    body: bytearray = field(default_factory=bytearray)
    streamed: bool = False

    def judge(self) -> dict:
        """The answer's text and validity from the response body (chat, completion, triage)."""
        if self.status == 200 and not self.streamed:
            try:
                payload = json.loads(bytes(self.body))
            except ValueError:
                payload = {}
            if "choices" in payload and payload["choices"]:
                choice = payload["choices"][0]
                self.text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
                self.valid = (payload.get("llmops") or {}).get("valid")
            elif payload.get("object") == "triage":
                self.text, self.valid = payload.get("text"), payload.get("valid")
        self.body = bytearray()
        return {"model": self.model, "status": self.status, "latency_ms": round(self.latency_ms, 1),
                "text": self.text, "valid": self.valid}


class Switchboard:
    """The ASGI app the server runs: routes each request to the live slot or the candidate;
    see the module doc. ``load(model, weights, alias)`` builds a Slot (blocking; run in a
    thread)."""

    def __init__(self, live: Slot, load: Callable[[str, str, str | None], Slot], admin_key: str | None,
                 drain_timeout_s: float = 120.0, seed: int | None = None) -> None:
        self.live, self.candidate = live, None
        self.load, self.admin_key, self.drain_timeout_s = load, admin_key, drain_timeout_s
        self.mode, self.share = "none", 0.0
        self.observations: deque = deque(maxlen=MAX_OBSERVATIONS)
        self.events: deque = deque(maxlen=50)
        self._loading = False
        self._rng = random.Random(seed)
        self._background: set[asyncio.Task] = set()
        self._event("live", live.id)

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return await self.live.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/admin/"):
            return await self._admin(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if TARGET_HEADER in headers or PROBE_HEADER in headers:
            return await self._admitted(scope, receive, send, headers)
        answering = scope["method"] == "POST" and path in ANSWER_ROUTES
        candidate = self.candidate
        if answering and candidate is not None and self.mode == "canary":
            slot = candidate if self._rng.random() < self.share else self.live
            outcome = await self._run(slot, scope, receive, send, capture=True)
            self._observe({"arm": "candidate" if slot is candidate else "live"} | outcome.judge())
            return None
        if answering and candidate is not None and self.mode == "shadow":
            body = await _read_body(receive)
            live = await self._run(self.live, scope, _replay(body), send, capture=True)
            if not live.streamed:
                self._spawn(self._shadow(candidate, scope, body, live))
            return None
        await self._run(self.live, scope, receive, send)
        return None

    async def _admitted(self, scope, receive, send, headers: dict) -> None:
        """A request the deploy stage sends (admin-authorised): to the candidate
        (``X-LLMOps-Target: candidate``) or the live version, marked as a smoke test
        (``X-LLMOps-Probe: smoke``) so that it is logged as one and costs no quota."""
        target, probe = headers.get(TARGET_HEADER), headers.get(PROBE_HEADER)
        problem = self._denied(scope)
        if problem is None and target not in (None, b"candidate", b"live"):
            problem = 400, f"{TARGET_HEADER.decode()} must be candidate or live"
        if problem is None and probe not in (None, b"smoke"):
            problem = 400, f"{PROBE_HEADER.decode()} must be smoke"
        slot = self.candidate if target == b"candidate" else self.live
        if problem is None and slot is None:
            problem = 404, "no candidate is loaded"
        if problem:
            return await _json(send, *_error(*problem))
        token = SYNTHETIC.set("smoke") if probe else None
        try:
            await self._run(slot, scope, receive, send)
        finally:
            if token is not None:
                SYNTHETIC.reset(token)
        return None

    async def _run(self, slot: Slot, scope, receive, send, capture: bool = False) -> Outcome:
        """Let ``slot`` answer; count it in flight meanwhile; name it in a response header;
        with ``capture``, keep its status, latency and (non-streamed) body."""
        outcome, started = Outcome(slot.id), time.perf_counter()
        model_header = slot.id.encode()

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                outcome.status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != MODEL_HEADER]
                message = message | {"headers": headers + [(MODEL_HEADER, model_header)]}
                outcome.streamed = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                       for k, v in headers)
            elif message["type"] == "http.response.body" and capture and not outcome.streamed \
                    and len(outcome.body) < MAX_CAPTURE:
                outcome.body.extend(message.get("body", b""))
            if send is not None:
                await send(message)

        slot.inflight += 1
        try:
            await slot.app(scope, receive, sending)
        finally:
            slot.inflight -= 1
            outcome.latency_ms = 1000 * (time.perf_counter() - started)
        return outcome

    async def _shadow(self, candidate: Slot, scope, body: bytes, live: Outcome) -> None:
        """The candidate answers a copy of a request the live version answered; both outcomes
        are kept side by side. The caller never sees it and is not charged for it."""
        token = SYNTHETIC.set("shadow")
        try:
            copy = await self._run(candidate, scope, _replay(body), None, capture=True)
        finally:
            SYNTHETIC.reset(token)
        if self.candidate is candidate and self.mode == "shadow":
            self._observe({"route": scope["path"], "live": live.judge(), "candidate": copy.judge()})

    def _observe(self, record: dict) -> None:
        self.observations.append(record | {"time": round(time.time(), 3)})

    def _spawn(self, coroutine: Awaitable) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.live.lifespan = Lifespan(self.live.app)
                    await self.live.lifespan.start()
                except Exception as exc:  # noqa: BLE001 - the server reports it and exits
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for slot in (self.candidate, self.live):
                    if slot is not None and slot.lifespan is not None:
                        await slot.lifespan.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ admin
    def _denied(self, scope) -> tuple[int, str] | None:
        headers = dict(scope.get("headers") or [])
        if self.admin_key:
            given = headers.get(ADMIN_HEADER, b"").decode(errors="replace").strip()
            if not given:
                bearer = headers.get(b"authorization", b"").decode(errors="replace")
                given = bearer[7:].strip() if bearer.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.admin_key.encode()):
                return 401, ("admin calls need the admin key (serve.admin_key_env) as 'Authorization: Bearer <key>' "
                             "or 'X-LLMOps-Admin-Key: <key>'")
            return None
        host = (scope.get("client") or ("", 0))[0]
        if host not in ("127.0.0.1", "::1", "localhost"):
            return 403, f"admin calls from {host} are refused: set serve.admin_key_env's variable to allow them"
        return None

    async def _admin(self, scope, receive, send) -> None:
        problem = self._denied(scope)
        if problem:
            return await _json(send, *_error(*problem))
        route, method = scope["path"], scope["method"]
        try:
            body = json.loads(await _read_body(receive) or b"{}") if method in ("POST", "PUT", "DELETE") else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            return await _json(send, *_error(400, f"bad JSON body: {exc}"))
        handler = {("GET", "/admin/status"): self._status, ("POST", "/admin/candidate"): self._load_candidate,
                   ("DELETE", "/admin/candidate"): self._discard_route, ("POST", "/admin/route"): self._route,
                   ("GET", "/admin/observations"): self._observations,
                   ("POST", "/admin/switch"): self._switch}.get((method, route))
        if handler is None:
            return await _json(send, *_error(404, f"no admin route {method} {route}"))
        status, payload = await handler(body)
        return await _json(send, status, payload)

    async def _status(self, body: dict) -> tuple[int, dict]:
        return 200, {"live": self.live.info(), "candidate": self.candidate.info() if self.candidate else None,
                     "mode": self.mode, "share": self.share, "loading": self._loading,
                     "observations": len(self.observations), "events": list(self.events)}

    async def _load_candidate(self, body: dict) -> tuple[int, dict]:
        model, weights, alias = body.get("model"), body.get("weights", "serving"), body.get("alias")
        timeout_s = float(body.get("timeout_s", 900))
        if not isinstance(model, str) or not model:
            return _error(400, "'model' (name/version) is required")
        if self._loading:
            return _error(409, "another candidate is being loaded")
        self._loading = True
        try:
            if self.candidate is not None:
                await self._discard("replaced by a new candidate")
            started = time.perf_counter()
            try:
                slot = await asyncio.to_thread(self.load, model, weights, alias)
            except Exception as exc:  # noqa: BLE001 - the reason goes to the caller; live traffic is untouched
                self._event("refused", model, f"{type(exc).__name__}: {exc}")
                return _error(422, f"cannot load {model}: {exc}", "load_error")
            slot.lifespan = Lifespan(slot.app)
            await slot.lifespan.start()
            readiness = slot.app.state.readiness
            deadline = time.monotonic() + timeout_s
            while not readiness.get("checked") and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if not readiness.get("ready"):
                reason = readiness.get("reason") or f"no golden answer within {timeout_s:.0f} s"
                await _release(slot)
                self._event("refused", slot.id, reason)
                return _error(422, f"{slot.id} is not ready: {reason}", "not_ready")
            self.candidate, self.mode, self.share = slot, "none", 0.0
            self.observations.clear()
            self._event("loaded", slot.id, f"{slot.served.variant} in {time.perf_counter() - started:.1f} s")
            return 200, {"candidate": slot.info()}
        finally:
            self._loading = False

    async def _discard_route(self, body: dict) -> tuple[int, dict]:
        if self.candidate is None:
            return _error(404, "no candidate is loaded")
        model = self.candidate.id
        await self._discard(body.get("reason") or "discarded")
        return 200, {"discarded": model, "live": self.live.id}

    async def _discard(self, reason: str) -> None:
        slot, self.candidate, self.mode, self.share = self.candidate, None, "none", 0.0
        self._event("discarded", slot.id, reason)
        self._spawn(self._retire(slot))

    async def _route(self, body: dict) -> tuple[int, dict]:
        mode, share = body.get("mode", "none"), body.get("share", 0.0)
        if mode not in ("none", "shadow", "canary"):
            return _error(400, f"mode must be none, shadow or canary (got {mode!r})")
        if mode != "none" and self.candidate is None:
            return _error(409, "no candidate is loaded")
        if mode == "canary" and not (isinstance(share, (int, float)) and 0 < share < 1):
            return _error(400, f"share must be between 0 and 1 (got {share!r})")
        self.mode, self.share = mode, float(share) if mode == "canary" else 0.0
        self.observations.clear()
        self._event("route", self.candidate.id if self.candidate else self.live.id,
                    mode + (f" {self.share:.0%}" if mode == "canary" else ""))
        return 200, {"mode": self.mode, "share": self.share}

    async def _observations(self, body: dict) -> tuple[int, dict]:
        return 200, {"mode": self.mode, "live": self.live.id,
                     "candidate": self.candidate.id if self.candidate else None,
                     "observations": list(self.observations)}

    async def _switch(self, body: dict) -> tuple[int, dict]:
        slot = self.candidate
        if slot is None:
            return _error(409, "no candidate is loaded")
        if body.get("model") not in (None, slot.id):
            return _error(409, f"the candidate is {slot.id}, not {body.get('model')}")
        old = self.live
        slot.since = time.time()
        self.live, self.candidate, self.mode, self.share = slot, None, "none", 0.0  # the switch
        self._event("switched", slot.id, f"from {old.id}")
        self._spawn(self._retire(old))
        return 200, {"live": slot.info(), "previous": old.id}

    async def _retire(self, slot: Slot) -> None:
        """Unload a version nothing routes to any more, once it finished what it holds."""
        deadline = time.monotonic() + self.drain_timeout_s
        while slot.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = slot.inflight
        await _release(slot)
        self._event("unloaded", slot.id, f"{left} requests still in flight after {self.drain_timeout_s:.0f} s"
                    if left else None)

    def _event(self, kind: str, model: str, detail: str | None = None) -> None:
        self.events.append({"at": _iso(time.time()), "event": kind, "model": model, "detail": detail})


async def _release(slot: Slot) -> None:
    if slot.lifespan is not None:
        await slot.lifespan.stop()
    await asyncio.to_thread(slot.engine.stop)
    slot.served.model = None  # the weights go with the last references
    if hasattr(slot.engine, "model"):
        slot.engine.model = None


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes):
    """A receive callable that hands an app ``body`` again (a request answered twice)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # like a client that stays connected; cancelled with the request
    return receive


def _error(status: int, message: str, kind: str = "admin_error") -> tuple[int, dict]:
    """A refusal in the API's error shape (serving/protocol.py)."""
    return status, error_body(message, kind)


async def _json(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
