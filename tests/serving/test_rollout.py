"""Versions side by side in one endpoint (serving/rollout.py), over real HTTP: a candidate
loaded beside the live version under steady load, switched to with no failed request; a
broken candidate refused while the live one answers; shadow copies and canary shares
observed; the admin routes' key."""
from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest

from tests.conftest import Load, register_run, sqlite_registry
from tests.serving.conftest import LiveServer

NAME = "rollout-triage"
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Where is my invoice?"}], "max_tokens": 4,
        "temperature": 0}


@pytest.fixture(scope="module")
def versions(tiny_run, tmp_path_factory):
    """The tiny run registered three times as rollout-triage 1, 2, 3 (1 is champion)."""
    from components import registry

    work = tmp_path_factory.mktemp("rollout")
    with sqlite_registry(work):
        for number in (1, 2, 3):
            register_run(tiny_run, work / f"register-{number}", NAME)
        registry.promote(registry.client(), NAME, 1, "the rollout tests' champion")
    return {"work": work, "state": work / "state"}


@contextlib.contextmanager
def endpoint(versions, triage=None, spec=None, admin_key=None, log=None, keys=None):
    """A live server whose app is the switchboard, serving version 1; (server, board)."""
    from serving import slots
    from serving.quota import Quota
    from serving.rollout import Switchboard
    from serving.settings import ServeSpec
    from serving.shared import Metrics

    spec = spec or ServeSpec()
    with sqlite_registry(versions["work"]):
        ctx = slots.Context(spec, {}, versions["state"], keys or {}, log, triage, Metrics(),
                            Quota(spec.rate_limits.requests_per_minute, spec.rate_limits.tokens_per_minute))
        board = Switchboard(slots.build(slots.load(f"{NAME}/1", "serving", ctx), ctx), slots.loader(ctx, NAME),
                            admin_key, seed=7)
        try:
            with LiveServer(board) as server:
                yield server, board
        finally:
            for slot in (board.candidate, board.live):
                if slot is not None:
                    slot.engine.stop()


def admin(server, method: str, path: str, body: dict | None = None, **headers) -> httpx.Response:
    return httpx.request(method, f"{server.url}/admin/{path}", json=body, headers=headers, timeout=300)


def test_a_switch_under_steady_load_fails_no_request_and_the_version_changes_once(versions, triage):
    with endpoint(versions, triage=triage) as (server, board), Load(server.url, CHAT) as load:
        load.wait_for(20)
        loaded = admin(server, "POST", "candidate", {"model": f"{NAME}/2", "alias": "champion"})
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["candidate"]["ready"] is True and loaded.json()["candidate"]["model"] == f"{NAME}/2"
        load.wait_for(20)
        before = time.perf_counter()
        switched = admin(server, "POST", "switch", {"model": f"{NAME}/2"})
        after = time.perf_counter()
        assert switched.status_code == 200 and switched.json()["previous"] == f"{NAME}/1", switched.text
        load.wait_for(20)
        deadline = time.monotonic() + 30
        while not any(e["event"] == "unloaded" for e in board.events) and time.monotonic() < deadline:
            time.sleep(0.1)
        # a request naming the alias reaches the new version
        by_alias = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT | {"model": f"{NAME}@champion"},
                              timeout=60)
    results = load.results
    assert [r for r in results if r[3] != 200] == [], "requests failed during the switch"
    assert {r[4] for r in results} == {f"{NAME}/1", f"{NAME}/2"}
    for client in range(4):
        models = [r[4] for r in sorted((r for r in results if r[0] == client), key=lambda r: r[1])]
        changes = sum(a != b for a, b in zip(models, models[1:]))
        assert changes == 1 and models[0] == f"{NAME}/1" and models[-1] == f"{NAME}/2", models
    assert all(r[4] == f"{NAME}/2" for r in results if r[1] > after)
    assert all(r[4] == f"{NAME}/1" for r in results if r[2] < before)
    assert [e["event"] for e in board.events][-3:] == ["loaded", "switched", "unloaded"], list(board.events)
    assert board.live.id == f"{NAME}/2" and board.candidate is None
    assert by_alias.status_code == 200 and by_alias.headers["x-llmops-model"] == f"{NAME}/2"


def test_a_broken_candidate_is_refused_while_the_live_version_answers(versions, triage):
    from components.registry import client
    from serving.model import ModelRef, fetch

    with sqlite_registry(versions["work"]):
        client()
        _, folder = fetch(ModelRef(NAME, number=3), versions["state"] / "serving" / "versions")
    adapter = folder / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit: the recorded SHA-256 no longer matches
    adapter.write_bytes(bytes(data))
    with endpoint(versions, triage=triage) as (server, board), Load(server.url, CHAT) as load:
        load.wait_for(10)
        refused = admin(server, "POST", "candidate", {"model": f"{NAME}/3"})
        load.wait_for(10)
        status = admin(server, "GET", "status").json()
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert f"cannot load {NAME}/3" in message and "adapter_model.safetensors" in message and "SHA-256" in message
    assert status["live"]["model"] == f"{NAME}/1" and status["candidate"] is None
    assert status["events"][-1]["event"] == "refused" and status["events"][-1]["model"] == f"{NAME}/3"
    assert [r for r in load.results if r[3] != 200] == [] and {r[4] for r in load.results} == {f"{NAME}/1"}


def test_a_candidate_whose_golden_answer_is_not_valid_json_is_refused(versions):
    # without the triage route's answer constraint, the tiny model writes no valid answer
    with endpoint(versions) as (server, board):
        refused = admin(server, "POST", "candidate", {"model": f"{NAME}/2", "timeout_s": 120})
        answered = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, timeout=60)
    assert refused.status_code == 422
    assert "is not ready: the golden prompt's answer is not valid" in refused.json()["error"]["message"]
    assert board.candidate is None and answered.status_code == 200
    assert answered.headers["x-llmops-model"] == f"{NAME}/1"


def test_shadow_copies_are_answered_by_the_candidate_never_returned_and_cost_no_quota(versions, triage, tmp_path):
    from serving.records import RequestLog
    from serving.settings import ServeSpec

    spec = ServeSpec(rate_limits={"requests_per_minute": 8})
    log = RequestLog(tmp_path / "requests")
    with endpoint(versions, triage=triage, spec=spec, log=log) as (server, board):
        assert admin(server, "POST", "candidate", {"model": f"{NAME}/2"}).status_code == 200
        assert admin(server, "POST", "route", {"mode": "shadow"}).json() == {"mode": "shadow", "share": 0.0}
        answers = [httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                              json=CHAT | {"messages": [{"role": "user", "content": f"shadow {i}"}]}) for i in range(6)]
        deadline = time.monotonic() + 30
        while len(board.observations) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        observed = admin(server, "GET", "observations").json()
        # the deploy stage's smoke requests: answered, marked, free of quota (8 a minute, 6 used)
        from components.deploy.local import Endpoint

        smoke = [Endpoint(server.url).chat(NAME, [{"role": "user", "content": f"smoke {i}"}], 4, candidate=False)
                 for i in range(4)]
    log.close()
    assert [a.status_code for a in answers] == [200] * 6
    assert {a.headers["x-llmops-model"] for a in answers} == {f"{NAME}/1"}  # the copy's answer never returned
    pairs = observed["observations"]
    assert len(pairs) == 6 and observed["mode"] == "shadow"
    assert {p["live"]["model"] for p in pairs} == {f"{NAME}/1"} and {p["candidate"]["model"] for p in pairs} == \
        {f"{NAME}/2"}
    assert [p["candidate"]["status"] for p in pairs] == [200] * 6  # 12 answers, 8 allowed: copies cost nothing
    # the same weights: the same greedy answers
    assert all(p["live"]["text"] == p["candidate"]["text"] and p["live"]["text"] for p in pairs)
    records = [json.loads(line) for f in sorted((tmp_path / "requests").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert [r["status"] for r in smoke] == [200] * 4
    assert sum(bool(r.get("shadow")) for r in records) == 6 and sum(bool(r.get("smoke")) for r in records) == 4
    assert sum(not (r.get("shadow") or r.get("smoke")) for r in records) == 6
    assert {r["model"] for r in records if r.get("shadow")} == {f"{NAME}/2"}


def test_canary_sends_a_share_of_live_requests_to_the_candidate(versions, triage):
    with endpoint(versions, triage=triage) as (server, board):
        assert admin(server, "POST", "candidate", {"model": f"{NAME}/2"}).status_code == 200
        assert admin(server, "POST", "route", {"mode": "canary", "share": 0.5}).status_code == 200
        answers = [httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                              json=CHAT | {"messages": [{"role": "user", "content": f"canary {i}"}]})
                   for i in range(30)]
        observed = admin(server, "GET", "observations").json()["observations"]
        bad = admin(server, "POST", "route", {"mode": "canary", "share": 1.5})
    served = [a.headers["x-llmops-model"] for a in answers]
    arms = [o["arm"] for o in observed]
    assert len(observed) == 30 and all(a.status_code == 200 for a in answers)
    assert [{"live": f"{NAME}/1", "candidate": f"{NAME}/2"}[arm] for arm in arms] == served
    assert 5 <= arms.count("candidate") <= 25  # 0.5 of 30 (seeded)
    assert all(o["latency_ms"] > 0 for o in observed)
    assert bad.status_code == 400 and "share must be between 0 and 1" in bad.text


def test_admin_routes_need_the_admin_key_when_one_is_set(versions):
    key = "admin-key-0123456789abcdef"
    with endpoint(versions, admin_key=key) as (server, board):
        without = admin(server, "GET", "status")
        wrong = admin(server, "GET", "status", authorization="Bearer not-the-key-at-all")
        right = admin(server, "GET", "status", authorization=f"Bearer {key}")
        candidate = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT, headers={"X-LLMOps-Target": "candidate"},
                               timeout=60)
        unknown = admin(server, "POST", "nothing", {}, authorization=f"Bearer {key}")
        no_candidate = admin(server, "POST", "switch", {}, authorization=f"Bearer {key}")
    assert without.status_code == 401 and wrong.status_code == 401 and "admin key" in without.text
    assert right.status_code == 200 and right.json()["live"]["model"] == f"{NAME}/1"
    assert candidate.status_code == 401
    assert unknown.status_code == 404 and no_candidate.status_code == 409


def test_with_api_keys_the_candidate_is_reached_with_both_keys(versions, triage):
    from components.deploy.local import Endpoint

    admin_key, api_key = "admin-key-0123456789abcdef", "client-key-0123456789abcdef"
    with endpoint(versions, triage=triage, admin_key=admin_key, keys={"smoke": api_key}) as (server, board):
        client = Endpoint(server.url, admin_key, api_key)
        client.admin("POST", "candidate", {"model": f"{NAME}/2"})
        hi = [{"role": "user", "content": "hi"}]
        candidate = client.chat(f"{NAME}/2", hi, 4, candidate=True)
        live = client.chat(NAME, hi, 4, candidate=False)
        keyless = Endpoint(server.url, admin_key, None).chat(f"{NAME}/2", hi, 4, candidate=True)
    assert (candidate["status"], candidate["model"]) == (200, f"{NAME}/2"), candidate
    assert (live["status"], live["model"]) == (200, f"{NAME}/1"), live
    assert keyless["status"] == 401 and "missing API key" in keyless["error"]
