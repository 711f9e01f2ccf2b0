"""The response cache and the request log, through the live endpoint."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from serving.records import RequestLog
from serving.settings import ServeSpec
from tests.serving.conftest import NAME, grew, samples

URL = "/v1/chat/completions"


def chat(server, content: str, **extra) -> httpx.Response:
    body = {"model": f"{NAME}/1", "messages": [{"role": "user", "content": content}], "max_tokens": 6} | extra
    return httpx.post(f"{server.url}{URL}", json=body, headers=extra.pop("headers", None), timeout=60)


def test_a_repeated_greedy_request_is_answered_from_the_cache(serve_app):
    with serve_app() as server:
        before = samples(server)
        first, again = chat(server, "Refund my duplicate charge"), chat(server, "Refund my duplicate charge")
        assert first.json()["choices"] == again.json()["choices"] and again.json()["usage"] == first.json()["usage"]
        other = chat(server, "Refund my duplicate charge", max_tokens=5)  # other settings: another key
        assert other.json()["usage"]["completion_tokens"] <= 5
        sampled = [chat(server, "Refund my duplicate charge", temperature=0.9) for _ in range(2)]
        assert all(r.status_code == 200 for r in sampled)
        stream = httpx.post(f"{server.url}{URL}", json={"model": f"{NAME}/1", "max_tokens": 6, "stream": True,
                                                         "messages": [{"role": "user",
                                                                       "content": "Refund my duplicate charge"}]})
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                       for line in stream.text.splitlines()
                       if line.startswith("data: {") and json.loads(line[6:])["choices"])
        assert text == first.json()["choices"][0]["message"]["content"]  # a hit streams the cached answer
        after = samples(server)
        assert grew(before, after, 'llmops_cache_total{result="hit"}') == 2  # again, and the stream
        assert grew(before, after, 'llmops_cache_total{result="miss"}') == 2  # first, max_tokens=5; sampled: none
        assert after["llmops_cache_entries"] == 2
    spec = ServeSpec(cache={"max_entries": 0})
    with serve_app(spec) as server:
        before = samples(server)
        chat(server, "Refund my duplicate charge"), chat(server, "Refund my duplicate charge")
        after = samples(server)
        assert grew(before, after, 'llmops_cache_total{result="hit"}') == 0 and after["llmops_cache_entries"] == 0


def test_every_request_is_logged_off_the_hot_path(serve_app, tmp_path):
    log = RequestLog(tmp_path / "requests", redact=True)
    secret = "s3cret-key-for-the-tests"
    with serve_app(keys={"alice": secret}, log=log) as server:
        auth = {"Authorization": f"Bearer {secret}"}
        ok = httpx.post(f"{server.url}{URL}", headers=auth, timeout=60, json={
            "model": f"{NAME}/1", "max_tokens": 4,
            "messages": [{"role": "system", "content": "Triage."},
                         {"role": "user", "content": "Mail me at ana@example.com, card 4111 1111 1111 1111"}]})
        assert ok.status_code == 200
        cached = httpx.post(f"{server.url}{URL}", headers=auth, json=json.loads(ok.request.content), timeout=60)
        assert cached.status_code == 200
    log.close()
    files = sorted((tmp_path / "requests").glob("requests-*.jsonl"))
    assert len(files) == 1
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["cached"] for r in records] == [False, True] and log.written == 2 and log.dropped == 0
    first = records[0]
    assert first["key_id"] == "alice" and first["model"] == f"{NAME}/1" and first["status"] == 200
    assert first["messages"][1]["content"] == "Mail me at [EMAIL], card [CARD]"
    assert first["answer"] == ok.json()["choices"][0]["message"]["content"]
    assert first["prompt_tokens"] == ok.json()["usage"]["prompt_tokens"]
    assert first["completion_tokens"] == ok.json()["usage"]["completion_tokens"]
    assert first["latency_ms"] > 0 and first["batch_size"] == 1 and first["request_id"] == ok.json()["id"]
    assert secret not in files[0].read_text()


def test_a_full_log_queue_drops_and_counts(tmp_path):
    log = RequestLog(tmp_path, max_queue=1)
    log._queue.put_nowait({"filler": True})  # the writer has not taken it yet or has: either way
    accepted = [log.append({"n": i}) for i in range(200)]
    log.close()
    assert log.dropped == accepted.count(False) and log.dropped > 0
    assert log.written + log.dropped == 201


def test_log_files_rotate_by_size(tmp_path):
    log = RequestLog(tmp_path, max_file_mib=0.0001)  # ~100 bytes: each record fills a file
    for i in range(3):
        log.append({"n": i, "pad": "x" * 200})
        time.sleep(0.3)  # written one by one
    log.close()
    names = sorted(p.name for p in tmp_path.glob("requests-*.jsonl"))
    hour = names[0].split("-")[1].split(".")[0]
    assert names == [f"requests-{hour}.1.jsonl", f"requests-{hour}.2.jsonl", f"requests-{hour}.jsonl"]
    assert sorted(json.loads(p.read_text())["n"] for p in tmp_path.glob("*.jsonl")) == [0, 1, 2]


def test_two_apps_count_their_own_requests_even_after_feast_is_imported(serve_app, tmp_path, monkeypatch):
    # what importing Feast before prometheus_client does: values in files shared by every
    # metric of the same name in the process
    from prometheus_client import values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    for _ in range(2):
        with serve_app() as server:
            chat(server, "Where is my invoice?")
            chat(server, "Where is my invoice?")
            after = samples(server)
        assert after['llmops_cache_total{result="hit"}'] == 1 and after['llmops_cache_total{result="miss"}'] == 1


def test_the_log_ships_its_files_to_s3_and_survives_a_dead_s3(tmp_path, s3_endpoint):
    """Files reach a real S3 server (moto on 127.0.0.1): the current file while it grows, a
    finished one when the next starts, all of it at close. An unreachable S3 is counted;
    the local files are complete and nothing waits for it."""
    import boto3

    from serving.records import S3Shipper
    from tests.serving.conftest import free_port

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="logs")
    log = RequestLog(tmp_path / "ok", max_file_mib=0.001, shipper=S3Shipper("s3://logs/llmops/m", s3_endpoint,
                                                                             every_s=0.2))
    for i in range(3):
        log.append({"n": i, "pad": "x" * 1100})  # over the 1 KB limit: a new file for every record
        time.sleep(0.5)
    log.close()
    local = {p.name: p.read_bytes() for p in (tmp_path / "ok").glob("*.jsonl")}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="logs", Prefix="llmops/m/")["Contents"]]
    assert len(local) == 3 and sorted(keys) == sorted(f"llmops/m/{name}" for name in local)
    for key in keys:
        assert s3.get_object(Bucket="logs", Key=key)["Body"].read() == local[key.rsplit("/", 1)[1]]
    assert log.shipper.errors == 0 and log.shipper.uploaded >= 3
    dead = RequestLog(tmp_path / "dead", shipper=S3Shipper("s3://logs/x", f"http://127.0.0.1:{free_port()}", 0.1))
    started = time.perf_counter()
    assert all(dead.append({"n": i}) for i in range(50))
    assert time.perf_counter() - started < 1.0  # answering never waits for S3
    dead.close(timeout_s=60)
    assert dead.written == 50 and dead.shipper.errors >= 1 and dead.shipper.uploaded == 0
    assert "Connect" in dead.shipper.last_error
    with pytest.raises(ValueError, match="is not s3://bucket"):
        S3Shipper("logs/x")
