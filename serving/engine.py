"""The engine: one thread that generates for every request, several requests at a time.

Requests wait in a bounded queue (full: the caller answers 429 with Retry-After instead of
queueing without bound). The engine takes the first request, then whatever else arrives
within ``max_wait_ms`` with the same sampling settings, up to ``max_batch_size``, and
generates them together (left padding, transformers' ``generate``, PyTorch or ONNX
Runtime). After every decoding step a stopping criterion hands each row its new text
(streaming), and ends a row on its end token, a stop string, its own ``max_tokens``, a
cancelled request, or (for JSON answers) where the object closes, so one long answer does
not hold the others' results. Greedy answers are the same in a batch as alone (tested).

Events go back to the request's asyncio loop: ``("delta", text)`` while it generates,
then ``("done", Finished)`` or ``("error", message)`` (a message, or an ApiError that says
which status the client gets). serving/upstream.py is the other engine: the same interface
over an external OpenAI-compatible server.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from components.lm import collate, inference_device
from components.task import object_end


@dataclass
class Finished:
    text: str
    finish_reason: str  # stop (end token or stop string) | length (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    queued_s: float
    first_token_s: float | None  # from submission to the first generated token
    total_s: float
    batch_size: int | None  # None: generated elsewhere (an upstream engine), batch unknown


@dataclass(eq=False)  # a request is itself: equal prompts are still two requests
class Request:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    json_only: bool = False  # end the answer where its first JSON object closes
    constraint: Any = None  # serving.constrain.AnswerConstraint: only the task's allowed answers
    prompt: str | None = None  # the prompt as text (what an upstream engine is sent); None: decoded from the ids
    emit: Callable[[tuple], None] = lambda event: None  # thread-safe: called from the engine thread
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def sampling(self) -> tuple[float, float]:
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


class QueueFull(RuntimeError):
    """More requests are waiting than ``max_queue`` allows."""


class _Rows:
    """Per-row bookkeeping for one batch, called by ``generate`` after each step."""

    def __init__(self, batch: list[Request], tokenizer):
        self.batch, self.tokenizer = batch, tokenizer
        self.ids: list[list[int]] = [[] for _ in batch]
        self.sent = [""] * len(batch)
        self.done: list[str | None] = [None] * len(batch)
        self.first: list[float | None] = [None] * len(batch)
        self.end = tokenizer.eos_token_id

    def text(self, row: int) -> str:
        return self.tokenizer.decode(self.ids[row], skip_special_tokens=True)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        last = input_ids[:, -1].tolist()
        for row, req in enumerate(self.batch):
            if self.done[row] is not None:
                continue
            if self.first[row] is None:
                self.first[row] = time.perf_counter()
            if last[row] == self.end:
                self._finish(row, "stop")
                continue
            self.ids[row].append(last[row])
            text = self.text(row)
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            end = object_end(text) if req.json_only else None
            if end is not None:
                self._finish(row, "stop", text[:end])
            elif cut >= 0:
                self._finish(row, "stop", text[:cut])
            elif len(self.ids[row]) >= req.max_tokens:
                self._finish(row, "length", text)
            elif req.cancelled.is_set():
                self.done[row] = "cancelled"
            else:
                self._send(row, text, hold=max((len(s) - 1 for s in req.stop), default=0))
        return torch.tensor([d is not None for d in self.done], dtype=torch.bool, device=input_ids.device)

    def _send(self, row: int, text: str, hold: int = 0) -> None:
        """Stream what is new, holding back a partial character and what could start a stop string."""
        upto = len(text) - hold
        if text.endswith("\ufffd"):  # half of a multi-byte character
            upto = min(upto, len(text) - 1)
        if upto > len(self.sent[row]):
            self.batch[row].emit(("delta", text[len(self.sent[row]):upto]))
            self.sent[row] = text[:upto]

    def _finish(self, row: int, reason: str, text: str | None = None) -> None:
        text = self.text(row) if text is None else text
        self._send(row, text)
        self.done[row] = reason


class BaseEngine:
    """What the routes use of an engine: ``submit`` (QueueFull when full), ``start``/``stop``,
    ``problem`` (why it cannot answer now, for /ready), ``pending`` (requests waiting)."""
    remote = False  # True: generation happens in another process, which is sent prompt text

    def submit(self, request: Request) -> None:
        raise NotImplementedError

    def problem(self, stall_s: float) -> str | None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """The engine's thread (every engine works in one: ``_thread``) still runs."""
        return self._thread.is_alive()

    def complete(self, prompt_ids: list[int], max_tokens: int, timeout_s: float = 120.0, **kwargs) -> Finished:
        """Generate one answer and wait for it (for start-up checks and benchmarks)."""
        result: queue.Queue = queue.Queue()
        request = Request(prompt_ids, max_tokens, emit=lambda e: e[0] != "delta" and result.put(e), **kwargs)
        self.submit(request)
        try:
            kind, value = result.get(timeout=timeout_s)
        except queue.Empty:
            request.cancelled.set()
            raise TimeoutError(f"no answer within {timeout_s} s") from None
        if kind == "error":
            raise RuntimeError(getattr(value, "message", value))
        return value


class Engine(BaseEngine):
    """Batched generation on a loaded model, in a thread of its own."""

    def __init__(self, tokenizer, model, max_batch_size: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64):
        self.tokenizer, self.model = tokenizer, model
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.busy_since: float | None = None  # when the running batch started; None when idle
        self.error: str | None = None  # set when a batch failed; cleared by the next good one
        self.on_batch: Callable[[int, float], None] = lambda size, seconds: None  # (batch size, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmops-engine", daemon=True)

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    @property
    def pending(self) -> int:
        return self.queue.qsize()

    def problem(self, stall_s: float) -> str | None:
        if not self.alive:
            return "the engine thread stopped"
        if self.error:
            return f"the engine's last batch failed: {self.error}"
        if self.busy_since is not None and time.perf_counter() - self.busy_since > stall_s:
            return f"the engine has been on one batch for more than {stall_s:.0f} s"
        return None

    def submit(self, request: Request) -> None:
        """Queue ``request``; QueueFull when ``max_queue`` requests already wait."""
        try:
            self.queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting") from None

    def _loop(self) -> None:
        held: list[Request] = []  # taken from the queue for a later batch (other sampling settings)
        while not self._stop.is_set():
            if held:
                first = held.pop(0)
            else:
                try:
                    first = self.queue.get(timeout=0.1)
                except queue.Empty:
                    continue
            batch = [first] + [r for r in held if r.sampling == first.sampling][:self.max_batch_size - 1]
            held = [r for r in held if r not in batch]
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                (batch if nxt.sampling == first.sampling else held).append(nxt)
            self._run([r for r in batch if not r.cancelled.is_set()])

    def _run(self, batch: list[Request]) -> None:
        if not batch:
            return
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from serving.constrain import ConstrainRows

        started = self.busy_since = time.perf_counter()
        try:
            ids, _, mask = collate([(r.prompt_ids, []) for r in batch], self.tokenizer, side="left")
            rows = _Rows(batch, self.tokenizer)
            temperature, top_p = batch[0].sampling
            sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature, "top_p": top_p}
                                        if temperature > 0 else {"do_sample": False})
            if any(r.constraint is not None for r in batch):
                sampling["logits_processor"] = LogitsProcessorList(
                    [ConstrainRows([r.constraint for r in batch], ids.shape[1])])
            device = getattr(self.model, "device", None) or inference_device()
            with torch.no_grad():
                self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    max_new_tokens=max(r.max_tokens for r in batch),
                                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                    stopping_criteria=StoppingCriteriaList([rows]), **sampling)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the engine
            self.error = f"{type(exc).__name__}: {exc}"
            for r in batch:
                r.emit(("error", self.error))
            return
        finally:
            self.busy_since = None
        self.error = None
        ended = time.perf_counter()
        for row, r in enumerate(batch):
            if rows.done[row] is None:  # generate ended first (its max_new_tokens)
                rows._finish(row, "length")
            r.emit(("done", Finished(
                text=rows.sent[row], finish_reason=rows.done[row], prompt_tokens=len(r.prompt_ids),
                completion_tokens=len(rows.ids[row]), queued_s=started - r.submitted,
                first_token_s=rows.first[row] - r.submitted if rows.first[row] else None,
                total_s=ended - r.submitted, batch_size=len(batch))))
        self.on_batch(len(batch), ended - started)
