"""POST /v1/completions: OpenAI's legacy completions, a text prompt continued as it is.

The prompt is tokenized as given (with the tokenizer's own special tokens, as vLLM does),
so a prompt that the version's chat template rendered gets the answer chat completions
gives for the same chat. This is what a gateway (serving/upstream.py) sends to another
engine, and what makes this endpoint a drop-in for vLLM's completions: keys, limits, the
response cache, the request log and metrics apply as to chat. Streaming sends OpenAI's
``text_completion`` chunks, then ``data: [DONE]``; ``stream_options.include_usage`` adds
the usage chunk.
"""
from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request as HttpRequest

from serving.engine import Finished
from serving.protocol import ApiError, CompletionRequest
from serving.shared import Shared, usage


def add_route(app: FastAPI, shared: Shared) -> None:
    """Register POST /v1/completions on ``app``."""
    served, spec = shared.served, shared.spec

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HttpRequest):
        shared.check_model(body.model)
        ids = served.tokenizer(body.prompt).input_ids
        max_tokens = body.max_tokens or spec.limits.default_max_tokens
        shared.check_max_tokens(max_tokens)
        shared.check_prompt(ids, request.state.caller, "prompt")
        started, completion_id, created = time.perf_counter(), f"cmpl-{uuid.uuid4().hex}", int(time.time())
        gen = shared.start(ids, max_tokens, body.temperature, body.top_p, body.stops, text=body.prompt)
        record = {"request_id": completion_id, "route": "/v1/completions", "prompt": body.prompt}

        def finished(done: Finished | None, status: int = 200, error: str | None = None) -> None:
            shared.outcome(gen, request, record, started, body.stream, done, status, error)

        def payload(choices: list[dict], **extra) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": served.id,
                    "choices": choices, "system_fingerprint": f"{served.id}:{served.variant}"} | extra

        if body.stream:
            def chunk(text: str | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
                if usage:
                    return payload([], usage=usage)
                return payload([{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}])

            return await shared.stream(gen, chunk, finished, body.include_usage)
        try:
            done = await shared.wait(gen)
        except ApiError as exc:
            finished(None, exc.status, exc.message)
            raise
        finished(done)
        return payload([{"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}],
                       usage=usage(done))
