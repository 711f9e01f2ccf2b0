"""Drift monitoring's parts on generated traffic: the log window, the reference found by
hash, the signals (real Evidently, real generated shifts), and alerts on a real local
webhook and SMTP server."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from components import generate
from components.base import StageError, file_sha256
from components.monitor import alerts
from components.monitor.reference import find_reference
from components.monitor.settings import AlertSpec, Signals
from components.monitor.signals import compute, reference_frame, window_frame
from components.monitor.window import read_window
from components.task import TaskSpec, answer_json, build_messages

MODEL = "support-triage/3"


def ticket_records(data: generate.DemoData, status: int = 200) -> list[dict]:
    """Request-log records for generated tickets: the default task's prompt (features fixed,
    no articles), the gold answer as the model's."""
    task, out = TaskSpec(), []
    for i, t in enumerate(data.tickets.to_dict("records")):
        row = t | {"plan": "pro", "account_weight": "+0"}
        out.append({"request_id": f"r{i}", "time": f"2026-11-29T10:{i // 60 % 60:02d}:{i % 60:02d}+00:00",
                    "route": "/v1/triage", "model": MODEL, "status": status, "latency_ms": 900.0 + i % 50,
                    "messages": build_messages(row, task, []), "answer": answer_json(row, task), "valid": True,
                    "articles": [{"article_id": t["article_id"], "score": 0.6}]})
    return out


def words_count(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def hashed_embedding(texts: list[str], side: str = "") -> np.ndarray:
    """A bag of hashed words, L2-normalised: a real (if plain) text embedding."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


class _Reference:  # what compute() and reference_frame() read of a Reference
    def __init__(self, records):
        self.prompts = [r["messages"] for r in records]
        self.labels = [json.loads(r["answer"]) for r in records]
        self.texts = [r["messages"][1]["content"] for r in records]


@pytest.fixture(scope="module")
def reference():
    return _Reference(ticket_records(generate.generate(n_tickets=600, n_customers=50, seed=1)))


def signals_of(records, reference, **changes) -> dict:
    cfg = Signals().model_copy(update=changes)
    current = window_frame(records, words_count, lambda text: json.loads(text))
    results, snapshot = compute(cfg, current, reference_frame(reference, words_count), reference.texts,
                                hashed_embedding)
    return {r.name: r for r in results}


def test_unshifted_traffic_drifts_nowhere_and_each_shift_moves_its_signals(reference):
    ordinary = signals_of(ticket_records(generate.generate(n_tickets=300, n_customers=50, seed=2)), reference)
    assert {n: r.status for n, r in ordinary.items() if r.status == "drift"} == {}
    assert ordinary["prompt_tokens"].value < 0.1 and ordinary["unseen_words"].value < 0.01
    assert ordinary["embeddings"].value < 0.55 and ordinary["answer_labels"].value < 0.1

    long = signals_of(ticket_records(generate.generate(n_tickets=300, n_customers=50, seed=2, shift="long")),
                      reference)
    assert long["prompt_tokens"].status == "drift" and long["prompt_tokens"].value > 1.0

    spanish = signals_of(ticket_records(generate.generate(n_tickets=300, n_customers=50, seed=2,
                                                          shift="language")), reference)
    assert spanish["unseen_words"].status == "drift" and spanish["unseen_words"].value > 0.2
    assert spanish["frequent_words"].status == "drift"
    assert "new frequent words:" in spanish["frequent_words"].detail
    assert spanish["embeddings"].status == "drift"


def test_a_small_window_is_not_enough_data_never_no_drift(reference):
    few = ticket_records(generate.generate(n_tickets=30, n_customers=10, seed=3, shift="long"))
    results = signals_of(few, reference)
    for name in ("prompt_tokens", "unseen_words", "frequent_words", "embeddings", "answer_labels"):
        assert results[name].status == "not enough data" and results[name].value is None, name
    assert results["answer_validity"].status == "ok" and results["answer_validity"].n == 30


def test_operations_signals_count_errors_rate_limits_and_latency(reference):
    records = ticket_records(generate.generate(n_tickets=100, n_customers=10, seed=4))
    for r in records[:10]:
        r.update(status=503, messages=None, answer=None)
    for r in records[10:30]:
        r.update(status=429, messages=None, answer=None)
    for r in records[30:40]:
        r["latency_ms"] = 45_000.0
    results = signals_of(records, reference)
    assert results["error_rate"].value == pytest.approx(0.10) and results["error_rate"].status == "drift"
    assert results["rate_limited_share"].value == pytest.approx(0.20) and results["rate_limited_share"].drifted
    assert results["p95_latency_ms"].value == pytest.approx(45_000.0) and results["p95_latency_ms"].drifted
    assert results["prompt_tokens"].n == 70  # content signals read answered requests only


def _write_log(folder: Path, name: str, lines: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(line + "\n" for line in lines))


def test_the_window_takes_the_newest_records_of_one_version_and_reports_the_rest(tmp_path):
    now = datetime(2026, 11, 29, 12, tzinfo=timezone.utc)

    def rec(i, model=MODEL, hours_ago=0.0):
        return json.dumps({"request_id": i, "route": "/v1/triage", "model": model, "status": 200,
                           "time": (now - timedelta(hours=hours_ago, seconds=-i)).isoformat()})

    _write_log(tmp_path, "requests-20261129T10.jsonl", [rec(i, hours_ago=2) for i in range(5)])
    _write_log(tmp_path, "requests-20261129T11.jsonl", [rec(i, hours_ago=1) for i in range(5, 8)]
               + ['{"torn": ', "[1, 2]"] + [rec(9, model="support-triage/2")])
    _write_log(tmp_path, "requests-20261129T11.1.jsonl", [rec(i, hours_ago=0.5) for i in range(10, 12)])
    _write_log(tmp_path, "notes.txt", ["not a log file"])

    window = read_window(str(tmp_path), MODEL, ["/v1/triage"], last_requests=4, hours=None, now=now)
    assert [r["request_id"] for r in window.records] == [6, 7, 10, 11]
    assert window.corrupt == ["requests-20261129T11.jsonl:4: Expecting value: line 1 column 10 (char 9)",
                              "requests-20261129T11.jsonl:5: not a JSON object"]
    assert dict(window.other_versions) == {"support-triage/2": 1}

    span = read_window(str(tmp_path), MODEL, ["/v1/triage"], last_requests=None, hours=1.5, now=now)
    assert [r["request_id"] for r in span.records] == [5, 6, 7, 10, 11]
    with pytest.raises(StageError, match="no such folder"):
        read_window(str(tmp_path / "absent"), MODEL, ["/v1/triage"], 10, None)


def test_the_reference_is_the_split_with_the_recorded_hash_and_survives_a_new_run(tmp_path):
    prepare = tmp_path / "artifacts"
    _write_log(prepare, "train.jsonl", [json.dumps({"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": f"ticket {i}"},
        {"role": "assistant", "content": "{}"}], "labels": {"intent": "x"}}) for i in range(3)])
    manifest = {"data_sha256": {"train": file_sha256(prepare / "train.jsonl")}}
    keep = tmp_path / "monitor" / "reference"

    ref = find_reference(manifest, "train", keep, prepare, run_id=None)
    assert ref.found_at == "artifacts" and ref.texts == ["ticket 0", "ticket 1", "ticket 2"]
    assert [m["role"] for m in ref.prompts[0]] == ["system", "user"]

    (prepare / "train.jsonl").write_text("{}\n")  # a later pipeline run rewrote artifacts/
    again = find_reference(manifest, "train", keep, prepare, run_id=None)
    assert again.found_at == "monitor copy" and again.texts == ref.texts

    with pytest.raises(StageError, match=r"SHA-256 000000000000\.\.\.\) is nowhere to be found.*another run's data"):
        find_reference({"data_sha256": {"train": "0" * 64}}, "train", keep, prepare, run_id=None)


# ---------------------------------------------------------------- alerts


def summary_with(statuses: dict[str, str]) -> dict:
    return {"model": MODEL, "time": "2026-11-29T12:00:00+00:00", "folder": "/tmp/run", "report": "/tmp/run/report.html",
            "window": {"requests": 300, "first": "a", "last": "b", "source": "log"},
            "signals": [{"name": n, "value": 0.3, "threshold": 0.1, "n": 300, "status": s, "statistic": "stat",
                         "detail": ""} for n, s in statuses.items()]}


def test_a_drifting_signal_alerts_once_per_cooldown_then_recovers():
    t0 = datetime(2026, 11, 29, 12, tzinfo=timezone.utc)
    fire, recovered, state = alerts.decide(summary_with({"embeddings": "drift", "prompt_tokens": "ok"}), {}, 60, t0)
    assert [s["name"] for s in fire] == ["embeddings"] and recovered == []
    fire, recovered, state = alerts.decide(summary_with({"embeddings": "drift", "prompt_tokens": "drift"}), state, 60,
                                           t0 + timedelta(minutes=30))
    assert [s["name"] for s in fire] == ["prompt_tokens"]  # embeddings: inside its cooldown
    fire, _, state = alerts.decide(summary_with({"embeddings": "not enough data", "prompt_tokens": "drift"}), state,
                                   60, t0 + timedelta(minutes=50))
    assert fire == [] and state["embeddings"]["drifting"] is True  # not enough data keeps the state
    fire, recovered, state = alerts.decide(summary_with({"embeddings": "drift", "prompt_tokens": "ok"}), state, 60,
                                           t0 + timedelta(minutes=61))
    assert [s["name"] for s in fire] == ["embeddings"] and [s["name"] for s in recovered] == ["prompt_tokens"]
    fire, _, state = alerts.decide(summary_with({"embeddings": "drift", "prompt_tokens": "drift"}), state, 60,
                                   t0 + timedelta(minutes=62))
    assert [s["name"] for s in fire] == ["prompt_tokens"]  # a new episode after its recovery: at once


def test_alerts_reach_a_webhook_slack_and_smtp_and_a_dead_channel_is_counted(tmp_path, webhook, smtp, monkeypatch):
    url, received = webhook
    host, inbox = smtp
    monkeypatch.setenv("T_WEBHOOK", f"{url}/hook")
    monkeypatch.setenv("T_SLACK", f"{url}/slack")
    monkeypatch.setenv("T_DEAD", "http://127.0.0.1:9/nothing-listens")
    monkeypatch.setenv("T_SMTP", host)
    monkeypatch.setenv("T_TO", "oncall@example.test")
    spec = AlertSpec.model_validate({"retries": 2, "backoff_s": 0.01, "timeout_s": 2, "channels": [
        {"kind": "file"}, {"kind": "webhook", "url_env": "T_WEBHOOK"}, {"kind": "slack", "url_env": "T_SLACK"},
        {"kind": "webhook", "url_env": "T_DEAD"}, {"kind": "webhook", "url_env": "T_UNSET"},
        {"kind": "email", "host_env": "T_SMTP", "to_env": "T_TO", "username_env": None}]})
    state, sink = tmp_path / "state.json", tmp_path / "alerts.jsonl"

    first = alerts.alert_run(spec, summary_with({"embeddings": "drift", "unseen_words": "ok"}), state, sink)
    assert len(first["sent"]) == 4 and first["skipped"] == ["webhook ($T_UNSET): $T_UNSET is not set"]
    assert len(first["failed"]) == 1 and "(after 3 tries)" in first["failed"][0] and "$T_DEAD" in first["failed"][0]
    hook = dict(received)
    assert hook["/hook"]["event"] == "llmops.drift.detected" and hook["/hook"]["model"] == MODEL
    assert hook["/hook"]["signals"][0] | {} == {"name": "embeddings", "value": 0.3, "threshold": 0.1,
                                                "statistic": "stat", "requests": 300, "detail": ""}
    assert hook["/slack"]["text"].startswith(f"Drift detected for {MODEL}") and "embeddings: 0.3" in hook["/slack"]["text"]
    assert len(inbox) == 1 and "embeddings" in inbox[0]["Subject"] and inbox[0]["To"] == "oncall@example.test"
    assert json.loads(sink.read_text())["signals"][0]["name"] == "embeddings"

    again = alerts.alert_run(spec, summary_with({"embeddings": "drift", "unseen_words": "ok"}), state, sink)
    assert again["alerts"] == [] and again["suppressed"] == ["embeddings"] and len(received) == 2

    back = alerts.alert_run(spec, summary_with({"embeddings": "ok", "unseen_words": "ok"}), state, sink)
    assert [a["event"] for a in back["alerts"]] == ["llmops.drift.recovered"]
    assert dict(received[2:])["/slack"]["text"].startswith("Drift recovered")


def test_an_empty_window_is_not_enough_data_everywhere(reference):
    results = signals_of([], reference)
    assert {r.status for r in results.values()} == {"not enough data"}
    assert all(r.value is None and r.n == 0 for r in results.values())


def test_the_window_reads_the_log_the_endpoint_shipped_to_s3(tmp_path, s3_endpoint):
    """serve.request_log.s3_uri -> monitor.log: the same records, read back from a real S3
    API (moto on 127.0.0.1); a bucket that does not exist is a clear error."""
    import boto3

    from serving.records import RequestLog, S3Shipper

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="logs")
    log = RequestLog(tmp_path / "local", shipper=S3Shipper(f"s3://logs/llmops/{MODEL.split('/')[0]}", s3_endpoint))
    for i in range(5):
        log.append({"request_id": i, "route": "/v1/triage", "model": MODEL if i != 2 else "support-triage/2",
                    "status": 200, "time": f"2026-11-29T10:00:0{i}+00:00"})
    log.close()
    window = read_window("s3://logs/llmops/support-triage", MODEL, ["/v1/triage"], 10, None, s3_endpoint)
    assert [r["request_id"] for r in window.records] == [0, 1, 3, 4] and window.files == 1
    assert dict(window.other_versions) == {"support-triage/2": 1} and window.source == "s3://logs/llmops/support-triage"
    with pytest.raises(StageError, match=r"request log s3://nothing/here: cannot read it: .*NoSuchBucket"):
        read_window("s3://nothing/here", MODEL, ["/v1/triage"], 10, None, s3_endpoint)


def test_window_embeddings_are_kept_per_text_and_the_sample_follows_the_requests(tmp_path):
    from components.monitor.embeddings import TextEmbeddings
    from components.monitor.signals import _sample

    encoded: list[str] = []

    def encode(texts):
        encoded.extend(texts)
        return np.array([[len(t), t.count("a")] for t in texts], dtype=np.float32)

    kept = TextEmbeddings(tmp_path, "all-minilm-l6-v2", encode, max_rows=3)
    assert kept.get(["aa", "b", "aa"]).tolist() == [[2, 2], [1, 0], [2, 2]]
    assert encoded == ["aa", "b"] and (kept.computed, kept.reused) == (2, 0)
    again = TextEmbeddings(tmp_path, "all-minilm-l6-v2", encode, max_rows=3)  # the next run reads the file
    assert again.get(["b", "ccca"]).tolist() == [[1, 0], [4, 1]]
    assert encoded == ["aa", "b", "ccca"] and (again.computed, again.reused) == (1, 1)
    again.get(["dd"])  # four texts seen, three kept: the least recently used ("aa") goes
    again.get(["aa"])
    assert encoded[-2:] == ["dd", "aa"]

    # the sample of an hourly window that moved by 10% is mostly the last one's
    texts = [f"request {i}" for i in range(11_000)]
    before, after = set(_sample(texts[:10_000], 1000, 0)), set(_sample(texts[1000:], 1000, 0))
    assert len(before) == len(after) == 1000 and len(before & after) > 850
    assert set(_sample(texts[:10_000], 1000, 1)) != before  # another seed, another sample
    # a text repeated 500 times in 5,000 requests is drawn about 100 times, never all or none
    drawn = _sample(["spam"] * 500 + texts[:4500], 1000, 0).count("spam")
    assert 60 < drawn < 140
