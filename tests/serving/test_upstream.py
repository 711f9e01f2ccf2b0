"""The endpoint as a gateway in front of another OpenAI-compatible engine (serve.upstream):
the upstream is this project's own endpoint (the in-process engine on the tiny champion,
a real uvicorn server on 127.0.0.1), the gateway a second server that loads the tokenizer
only. Answers, token counts, streaming, keys, limits and failures, through real HTTP."""
from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace

import httpx
import openai
import pytest

from components.catalog import ModelError
from components.lm import prompt_ids
from serving.model import load_folder
from serving.settings import ServeSpec
from serving.shared import prompt_text
from tests.serving.conftest import NAME, LiveServer, free_port, grew, samples, serve_cli
from tests.serving.test_serve_cli import serve_args

MESSAGES = [{"role": "system", "content": "Triage the ticket."},
            {"role": "user", "content": "The sync app logs me out every hour."}]
KEY_ENV = "LLMOPS_TEST_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def upstream(served):
    """The project's endpoint with its in-process engine: the upstream, without keys or limits
    (nor a cache: every request it gets is generated)."""
    from serving.app import create_app
    from serving.engine import Engine

    engine = Engine(served.tokenizer, served.model).start()
    try:
        with LiveServer(create_app(served, engine, ServeSpec(cache={"max_entries": 0}))) as server:
            yield server
    finally:
        engine.stop()


@pytest.fixture
def gateway(served, monkeypatch):
    """``gateway(url, spec=..., keys=..., **upstream)``: a LiveServer whose engine is the
    upstream at ``url`` (its OpenAI base URL), as serve.upstream configures it."""
    from serving.app import create_app
    from serving.upstream import UpstreamEngine

    engines = []
    # the tiny champion's golden answer is noise; a version without one is ready on any answer
    version = replace(served, model=None, variant="upstream",
                      manifest={k: v for k, v in served.manifest.items() if k != "golden"})

    def make(url: str, spec: dict | None = None, keys: dict | None = None, triage=None, key: str | None = None,
             **upstream):
        if key is not None:
            monkeypatch.setenv(KEY_ENV, key)
            upstream["api_key_env"] = KEY_ENV
        cfg = ServeSpec(**(spec or {}), upstream={"url": url, **upstream})
        engine = UpstreamEngine.from_spec(cfg.upstream, version.id, version.tokenizer, cfg.batching.max_queue)
        engines.append(engine.start())
        return LiveServer(create_app(version, engine, cfg, keys, triage=triage))

    yield make
    for engine in engines:
        engine.stop()


def chat(url: str, stream: bool = False, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": f"{NAME}/1", "messages": MESSAGES, "max_tokens": 12, "stream": stream} | extra)


def test_answers_through_the_gateway_are_the_upstreams_with_its_token_counts(served, upstream, gateway):
    prompt = prompt_text(MESSAGES, served.tokenizer)
    assert served.tokenizer(prompt).input_ids == prompt_ids(MESSAGES, served.tokenizer)  # the same prompt
    completion = {"model": f"{NAME}/1", "prompt": prompt, "max_tokens": 12}
    direct_chat = chat(upstream.url).json()
    direct = httpx.post(f"{upstream.url}/v1/completions", json=completion, timeout=60).json()
    assert direct["choices"][0]["text"] == direct_chat["choices"][0]["message"]["content"]
    assert direct["usage"] == direct_chat["usage"]
    with gateway(f"{upstream.url}/v1", spec={"cache": {"max_entries": 0}}) as gw:
        ready = gw.wait_ready()
        before = samples(gw)
        through_chat = chat(gw.url).json()
        through = httpx.post(f"{gw.url}/v1/completions", json=completion, timeout=60).json()
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="not-needed", max_retries=0)
        chunks = list(client.chat.completions.create(model=f"{NAME}/1", messages=MESSAGES, max_tokens=12,
                                                     stream=True, stream_options={"include_usage": True}))
        pieces = list(client.completions.create(model=f"{NAME}/1", prompt=prompt, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}))
        after = samples(gw)
        models = httpx.get(f"{gw.url}/v1/models").json()["data"][0]
    assert ready.status_code == 200 and ready.json()["variant"] == "upstream"
    assert through_chat["choices"][0]["message"] == direct_chat["choices"][0]["message"]
    assert through_chat["usage"] == direct_chat["usage"] and through_chat["model"] == f"{NAME}/1"
    assert through["choices"][0]["text"] == direct["choices"][0]["text"] and through["usage"] == direct["usage"]
    assert through["object"] == "text_completion" and through["id"].startswith("cmpl-")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == through_chat["choices"][0][
        "message"]["content"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed in pieces
    assert chunks[-1].usage.completion_tokens == direct_chat["usage"]["completion_tokens"]
    assert "".join(p.choices[0].text for p in pieces if p.choices) == direct["choices"][0]["text"]
    assert pieces[-1].usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert models["id"] == f"{NAME}/1" and models["variant"] == "upstream"
    # the gateway counts what the upstream reported (4 answers), and cached nothing
    assert grew(before, after, "llmops_generated_tokens_total") == 4 * direct["usage"]["completion_tokens"]
    assert grew(before, after, 'llmops_requests_total{route="/v1/completions",status="200"}') == 2


def test_the_gateways_keys_and_rate_limits_apply_the_upstream_has_none(upstream, gateway):
    key = "client-key-0123456789"
    with gateway(f"{upstream.url}/v1", spec={"rate_limits": {"requests_per_minute": 2}},
                 keys={"client": key}) as gw:
        anonymous = chat(gw.url)
        answers = [httpx.post(f"{gw.url}/v1/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                              json={"model": f"{NAME}/1", "prompt": "Hello", "max_tokens": 3}) for _ in range(3)]
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_api_key"
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert "rate limit of 2 requests per minute reached for client" in answers[2].json()["error"]["message"]
    assert chat(upstream.url).status_code == 200  # the upstream itself asks for nothing


def test_the_upstreams_key_comes_from_the_environment(serve_app, gateway):
    secret = "gateway-to-upstream-0123"
    with serve_app(keys={"gateway": secret}) as keyed:
        with gateway(f"{keyed.url}/v1", key=secret) as gw:
            assert chat(gw.url).status_code == 200
        with gateway(f"{keyed.url}/v1") as gw:  # no serve.upstream.api_key_env
            refused = chat(gw.url)
    assert refused.status_code == 502 and refused.json()["error"]["code"] == "upstream_error"
    message = refused.json()["error"]["message"]
    assert message.startswith(f"the upstream engine at {keyed.url}/v1 answered HTTP 401: missing API key")
    assert message.endswith("check serve.upstream.api_key_env")


def test_an_unset_key_variable_is_refused_naming_the_key(served, monkeypatch):
    from serving.upstream import UpstreamEngine

    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = ServeSpec(upstream={"url": "http://127.0.0.1:9/v1", "api_key_env": KEY_ENV})
    with pytest.raises(ValueError, match=f"serve.upstream.api_key_env: \\${KEY_ENV} is not set"):
        UpstreamEngine.from_spec(cfg.upstream, "m/1", served.tokenizer, 4)


def test_an_upstream_that_is_down_is_503_naming_it_and_ready_says_why(gateway):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with gateway(dead, connect_timeout_s=2) as gw:
        plain = chat(gw.url)
        streamed = chat(gw.url, stream=True)
        ready = httpx.get(f"{gw.url}/ready")
        others = [httpx.get(f"{gw.url}{route}").status_code for route in ("/health", "/v1/models", "/metrics")]
    for r in (plain, streamed):  # a stream that fails before its first piece gets the status too
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert r.json()["error"]["message"].startswith(f"the upstream engine at {dead} is unreachable")
        assert r.json()["error"]["code"] == "upstream_unreachable" and "Traceback" not in r.text
    assert ready.status_code == 503 and ready.json()["reason"].startswith(f"the upstream engine at {dead} is "
                                                                          "unreachable")
    assert others == [200, 200, 200]


def test_a_wrong_model_name_or_a_slow_upstream_are_502_and_504(serve_app, upstream, gateway):
    with gateway(f"{upstream.url}/v1", model="nope") as gw:
        wrong = chat(gw.url)
        ready = httpx.get(f"{gw.url}/ready")
    assert wrong.status_code == 502 and "answered HTTP 404: model 'nope' is not served here" in wrong.text
    assert wrong.json()["error"]["message"].endswith("check serve.upstream.url and serve.upstream.model")
    assert ready.status_code == 503 and f"does not serve 'nope' (it serves {NAME}/1)" in ready.json()["reason"]
    # an upstream that waits 2 s for batch mates before its first token; the gateway reads 0.5 s
    with serve_app(ServeSpec(batching={"max_wait_ms": 2000})) as slow:
        with gateway(f"{slow.url}/v1", read_timeout_s=0.5) as gw:
            late = chat(gw.url)
    assert late.status_code == 504 and late.json()["error"]["code"] == "upstream_timeout"
    assert f"the upstream engine at {slow.url}/v1 did not answer in time" in late.json()["error"]["message"]


def test_completions_of_the_project_endpoint(served, serve_app):
    spec = ServeSpec(limits={"max_prompt_tokens": 40, "max_tokens": 32, "max_body_bytes": 2048})
    ok = {"model": f"{NAME}/1", "prompt": "Customer: my invoice is wrong.\nAgent:", "max_tokens": 8}
    cases = [
        ({**ok, "model": "other"}, 404, "model 'other' is not served here", "model"),
        ({**ok, "prompt": ""}, 422, "prompt: String should have at least 1 character", "prompt"),
        ({**ok, "prompt": ["a", "b"]}, 422, "prompt: Input should be a valid string", "prompt"),
        ({**ok, "echo": True}, 422, "echo: Input should be False", "echo"),
        ({**ok, "max_tokens": 33}, 400, "max_tokens 33 exceeds the limit of 32", "max_tokens"),
        ({**ok, "prompt": "word " * 60}, 400, "tokens; the limit is 40 (serve.limits.max_prompt_tokens)", "prompt"),
        ({**ok, "prompt": "x" * 3000}, 413, "exceeds the limit of 2048", None),
    ]
    with serve_app(spec) as server:
        plain = httpx.post(f"{server.url}/v1/completions", json=ok, timeout=60)
        stream = httpx.post(f"{server.url}/v1/completions", json=ok | {"stream": True}, timeout=60)
        refusals = [(httpx.post(f"{server.url}/v1/completions", json=body), status, message, param)
                    for body, status, message, param in cases]
    answer = plain.json()
    assert plain.status_code == 200 and answer["object"] == "text_completion"
    assert answer["usage"]["prompt_tokens"] == len(served.tokenizer(ok["prompt"]).input_ids)
    assert 0 < answer["usage"]["completion_tokens"] <= 8 and answer["choices"][0]["finish_reason"] in ("stop", "length")
    lines = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == answer["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
    for r, status, message, param in refusals:
        assert r.status_code == status, r.text
        assert message in r.json()["error"]["message"], (message, r.text)
        assert param is None or r.json()["error"]["param"] == param


def test_the_gateway_loads_the_tokenizer_only_with_the_checks(served, tmp_path):
    variant, tokenizer, model = load_folder(served.folder, {}, tmp_path / "state", tokenizer_only=True)
    assert model is None and variant == "base+adapter"
    assert prompt_ids(MESSAGES, tokenizer) == prompt_ids(MESSAGES, served.tokenizer)
    folder = shutil.copytree(served.folder, tmp_path / "version")
    weights = folder / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    with pytest.raises(ModelError, match=r"adapter_model.safetensors: SHA-256 .* does not match the recorded"):
        load_folder(folder, {}, tmp_path / "state", tokenizer_only=True)


def test_triage_through_the_gateway_is_validated_not_constrained(upstream, gateway, triage, feature_project):
    from tests.serving.test_triage import ticket

    data = feature_project["data"]
    with gateway(f"{upstream.url}/v1", triage=triage) as gw:
        r = httpx.post(f"{gw.url}/v1/triage", timeout=120, json=ticket(data, data.tickets.ticket_id.iloc[0]))
    body = r.json()
    assert r.status_code == 200 and body["constrained"] is False and body["variant"] == "upstream"
    assert body["valid"] == (not body["errors"]) and body["text"]  # the tiny model's noise: valid false, its text
    assert body["usage"]["prompt_tokens"] > 0 and body["articles"] and body["features"]


def test_llmops_serve_with_an_upstream_url_is_a_gateway(champion, upstream, tmp_path):
    port = free_port()
    proc = serve_cli(serve_args(champion, tmp_path, "--model", f"{NAME}@champion", "--port", str(port), "--set",
                                "serve.triage=false", "--set", f"serve.upstream.url={upstream.url}/v1"), tmp_path, port)
    try:
        through, direct = chat(f"http://127.0.0.1:{port}").json(), chat(upstream.url).json()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert through["choices"][0]["message"] == direct["choices"][0]["message"]
    assert through["usage"] == direct["usage"] and through["system_fingerprint"] == f"{NAME}/1:upstream"
    assert f"serving {NAME}/1 ({NAME}@champion) through the upstream engine at {upstream.url}/v1 (model " \
           f"'{NAME}/1', up to 16 requests at once); tokenizer loaded in" in err
    assert "Traceback" not in err
