"""The endpoint on the tiny champion: a real server on 127.0.0.1, the official openai SDK
and plain HTTP; every refusal with its status and reason."""
from __future__ import annotations

import concurrent.futures
import json
import queue
import time
from dataclasses import replace

import httpx
import openai
import pytest

from components.lm import prompt_ids
from serving.engine import Engine, Request
from serving.records import RequestLog
from serving.settings import LimitsSpec, ServeSpec
from tests.serving.conftest import NAME, grew, samples

MESSAGES = [{"role": "system", "content": "Triage the ticket."},
            {"role": "user", "content": "I was billed twice for my Boards plan."}]


def direct(served, messages=MESSAGES, max_tokens=12, **kwargs) -> str:
    """The greedy answer of an engine of its own, called in-process (no HTTP)."""
    engine = Engine(served.tokenizer, served.model).start()
    try:
        return engine.complete(prompt_ids(messages, served.tokenizer), max_tokens, **kwargs).text
    finally:
        engine.stop()


def test_openai_sdk_plain_and_streaming(served, serve_app):
    expected = direct(served)
    with serve_app() as server:
        before = samples(server)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)
        reply = client.chat.completions.create(model=f"{NAME}/1", messages=MESSAGES, max_tokens=12)
        assert reply.choices[0].message.content == expected and reply.model == f"{NAME}/1"
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert 0 < reply.usage.completion_tokens <= 12
        assert reply.usage.prompt_tokens == len(prompt_ids(MESSAGES, served.tokenizer))
        chunks = list(client.chat.completions.create(model=f"{NAME}@champion", messages=MESSAGES, max_tokens=12,
                                                     stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        assert [m.id for m in client.models.list().data] == [f"{NAME}/1"]
        after = samples(server)
    # both answers' latency (the stream's observed when it ends); one first token: the stream
    # asked what the plain request had, and got it from the cache
    assert grew(before, after, 'llmops_request_seconds_count{route="/v1/chat/completions"}') == 2
    assert grew(before, after, "llmops_time_to_first_token_seconds_count") == 1
    assert grew(before, after, 'llmops_cache_total{result="hit"}') == 1


def test_greedy_answers_are_the_same_batched_as_alone(served):
    prompts = [[{"role": "user", "content": text}] for text in
               ("Refund please.", "I cannot log in to the sync app since this morning, help!", "Crash on start.",
                "Please add dark mode to the boards, our whole team of forty people would like it.")]
    alone = [direct(served, p, max_tokens=10) for p in prompts]
    engine = Engine(served.tokenizer, served.model, max_batch_size=8, max_wait_ms=2000)
    results: queue.Queue = queue.Queue()
    batch_sizes: list[int] = []
    engine.on_batch = lambda size, seconds: batch_sizes.append(size)
    for i, p in enumerate(prompts):  # queued before the engine starts: one batch of four
        engine.submit(Request(prompt_ids(p, served.tokenizer), 10, emit=lambda e, i=i: e[0] == "done" and
                              results.put((i, e[1]))))
    engine.start()
    try:
        done = dict(results.get(timeout=60) for _ in prompts)
    finally:
        engine.stop()
    assert [done[i].text for i in range(len(prompts))] == alone
    assert {d.batch_size for d in done.values()} == {4} and batch_sizes == [4]


def test_stop_strings_and_max_tokens(served):
    full = direct(served, max_tokens=16)
    assert len(full) > 4, full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert direct(served, max_tokens=16, stop=[stop]) == full[:full.index(stop)]
    engine = Engine(served.tokenizer, served.model).start()
    try:
        short = engine.complete(prompt_ids(MESSAGES, served.tokenizer), 3)
    finally:
        engine.stop()
    assert short.completion_tokens == 3 and short.finish_reason == "length" and full.startswith(short.text)


def test_refusals_name_what_is_wrong(serve_app):
    spec = ServeSpec(limits=LimitsSpec(max_prompt_tokens=40, max_tokens=32, max_body_bytes=2048))
    ok = {"model": f"{NAME}/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({**ok, "model": "other"}, 404, "model 'other' is not served here", "model"),
        ({**ok, "messages": []}, 422, "messages: List should have at least 1 item", "messages"),
        ({**ok, "messages": [{"role": "robot", "content": "x"}]}, 422, "messages.0.role: Input should be", None),
        ({**ok, "temperature": 5}, 422, "temperature: Input should be less than or equal to 2", "temperature"),
        ({**ok, "n": 2}, 422, "n: Input should be less than or equal to 1", "n"),
        ({**ok, "max_tokens": 33}, 400, "max_tokens 33 exceeds the limit of 32", "max_tokens"),
        ({**ok, "messages": [{"role": "user", "content": "word " * 60}]}, 400, "the limit is 40", "messages"),
        ({**ok, "messages": [{"role": "user", "content": "x" * 3000}]}, 413, "exceeds the limit of 2048", None),
        ({**ok, "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": 12}}}},
         400, "response_format.json_schema.schema is not a valid JSON Schema", "response_format.json_schema.schema"),
    ]
    with serve_app(spec) as server:
        before = samples(server)
        for body, status, message, param in cases:
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert message in error["message"], (message, error)
            assert param is None or error["param"] == param
            assert "Traceback" not in r.text
        r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type":
                                                                                            "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["error"]["message"]
        assert httpx.post(f"{server.url}/v1/chat/completions", json=ok).status_code == 200  # still answering
        after = samples(server)
    assert grew(before, after, 'llmops_requests_total{route="/v1/chat/completions",status="404"}') == 1
    assert grew(before, after, 'llmops_rejected_total{reason="body_too_large"}') == 1
    assert grew(before, after, "llmops_time_to_first_token_seconds_count") == 1
    assert grew(before, after, "llmops_generated_tokens_total") == 4


def test_api_keys(serve_app):
    secret = "s3cret-key-for-the-tests"
    with serve_app(keys={"ci": secret}) as server:
        url = f"{server.url}/v1/chat/completions"
        body = {"model": f"{NAME}/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        missing = httpx.post(url, json=body)
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer not-the-key-at-all"})
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert missing.json()["error"]["code"] == "missing_api_key"
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0)
        assert client.chat.completions.create(**body).usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-wrong-wrong", max_retries=0) \
                .chat.completions.create(**body)


def test_a_full_queue_answers_429_and_a_slow_answer_504(serve_app):
    # the engine is not started: the golden prompt and the first request wait in the queue
    # (2 places) until their timeout; the second finds it full
    spec = ServeSpec(batching={"max_queue": 2, "retry_after_s": 3}, limits={"request_timeout_s": 1.5})
    body = {"model": f"{NAME}/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with serve_app(spec, start=False) as server:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=body, timeout=30)
            time.sleep(0.5)
            second = httpx.post(f"{server.url}/v1/chat/completions", json=body)
            assert second.status_code == 429 and second.headers["retry-after"] == "3"
            assert second.json()["error"]["code"] == "queue_full"
            r = first.result()
        assert r.status_code == 504 and "no answer within 2 s" in r.json()["error"]["message"]
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and "the engine thread stopped" in ready.json()["reason"]


def test_ready_needs_a_valid_golden_answer(served, serve_app):
    # the tiny model answers the golden chat with noise: not ready, and /ready says why
    with serve_app() as server:
        r = server.wait_ready()
        assert r.status_code == 503 and "the golden prompt's answer is not valid" in r.json()["reason"]
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_ready_then_503_when_the_engine_fails(served, serve_app):
    class Faulty:
        """The model, until ``broken`` is set: then generate raises."""
        broken = False

        def __getattr__(self, name):
            return getattr(served.model, name)

        def generate(self, **kwargs):
            if self.broken:
                raise RuntimeError("injected engine fault")
            return served.model.generate(**kwargs)

    faulty = Faulty()
    # a version without a golden example (registered before they existed) needs any answer
    older = replace(served, model=faulty, manifest={k: v for k, v in served.manifest.items() if k != "golden"})
    with serve_app(version=older) as server:
        assert server.wait_ready().json() == {"status": "ready", "model": f"{NAME}/1", "variant": older.variant}
        faulty.broken = True
        body = {"model": f"{NAME}/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert r.status_code == 500 and "injected engine fault" in r.json()["error"]["message"]
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and "injected engine fault" in ready.json()["reason"]
        faulty.broken = False
        assert httpx.post(f"{server.url}/v1/chat/completions", json=body).status_code == 200
        assert httpx.get(f"{server.url}/ready").status_code == 200  # recovered


def test_json_response_format_reports_validity(served, serve_app):
    body = {"model": f"{NAME}/1", "messages": MESSAGES, "max_tokens": 24, "response_format": {"type": "json_object"}}
    schema = {"type": "object", "properties": {"intent": {"enum": ["billing_refund"]}}, "required": ["intent"]}
    with serve_app() as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert r.status_code == 200
        check = r.json()["llmops"]
        content = r.json()["choices"][0]["message"]["content"]
        try:
            valid = isinstance(json.loads(content), dict)
        except json.JSONDecodeError:
            valid = False
        assert check["valid"] is valid and bool(check["errors"]) is not valid
        r = httpx.post(f"{server.url}/v1/chat/completions",
                       json=body | {"response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "t", "schema": schema}}})
        assert r.status_code == 200 and r.json()["llmops"]["valid"] is False


def test_rate_limits_per_key(serve_app, tmp_path):
    keys = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789ab"}
    spec = ServeSpec(rate_limits={"requests_per_minute": 2})
    body = {"model": f"{NAME}/1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    log = RequestLog(tmp_path / "log")
    with serve_app(spec, keys=keys, log=log) as server:
        url = f"{server.url}/v1/chat/completions"
        alice = [httpx.post(url, json=body, headers={"Authorization": f"Bearer {keys['alice']}"}) for _ in range(3)]
        assert [r.status_code for r in alice] == [200, 200, 429]
        error = alice[2].json()["error"]
        assert error["code"] == "rate_limited" and "2 requests per minute reached for alice" in error["message"]
        assert 1 <= int(alice[2].headers["retry-after"]) <= 60
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {keys['bob']}"}).status_code == 200
        assert httpx.post(url, json=body).status_code == 401
    log.close()
    records = [json.loads(line) for f in (tmp_path / "log").glob("*.jsonl") for line in f.read_text().splitlines()]
    refused = sorted((r["status"], r["key_id"], r.get("rejected")) for r in records if r["status"] != 200)
    assert refused == [(401, None, "missing_api_key"), (429, "alice", "rate_limited")]  # monitoring counts them
    assert sum(r["status"] == 200 for r in records) == 3

def test_token_rate_limit(served, serve_app):
    # the first answer spends most of the minute's tokens; the same prompt no longer fits
    messages = [{"role": "user", "content": "please triage this ticket " * 3}]
    budget = int(1.5 * len(prompt_ids(messages, served.tokenizer)))
    body = {"model": f"{NAME}/1", "messages": messages, "max_tokens": 2}
    with serve_app(ServeSpec(rate_limits={"tokens_per_minute": budget})) as server:
        url = f"{server.url}/v1/chat/completions"
        before = samples(server)
        first = httpx.post(url, json=body)
        assert first.status_code == 200
        second = httpx.post(url, json={**body, "max_tokens": 3})
        assert second.status_code == 429 and f"{budget} tokens per minute reached for ip:127.0.0.1" in \
            second.json()["error"]["message"]
        assert grew(before, samples(server), 'llmops_rejected_total{reason="rate_limited"}') == 1
