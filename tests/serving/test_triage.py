"""POST /v1/triage through a live endpoint, with the features and articles of a real Feast
store served by a real feature server process (`llmops features serve`)."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone

import httpx
import pandas as pd

from components.splits import read_examples
from serving.records import RequestLog
from tests.conftest import run_cli
from tests.serving.conftest import NAME, free_port

URL = "/v1/triage"
PROFILE = ["plan", "tenure_days", "open_tickets_30d", "seats"]


def ticket(data, ticket_id: str, **extra) -> dict:
    row = data.tickets.set_index("ticket_id").loc[ticket_id]
    return {"ticket_id": ticket_id, "subject": row.subject, "body": row.body, "channel": row.channel,
            "customer_id": row.customer_id} | extra


def latest_profile(state, customer: str) -> dict:
    table = pd.read_parquet(state / "feast" / "support-triage" / "offline" / "customer_profiles.parquet")
    row = table[table.customer_id == customer].sort_values("event_timestamp").iloc[-1]
    return {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in PROFILE}


def test_the_triage_prompt_is_the_prompt_training_used(serve_app, triage, feature_project, tmp_path):
    """With the ticket's time, the endpoint reads the features as of that time and retrieves
    articles: the prompt must be exactly the one prepare wrote for that ticket."""
    data, examples = feature_project["data"], read_examples(feature_project["prepare"] / "test.jsonl")[:3]
    log = RequestLog(tmp_path / "requests")
    answers = []
    with serve_app(log=log, triage=triage) as server:
        for example in examples:
            when = data.tickets.set_index("ticket_id").loc[example["ticket_id"], "created_at"]
            r = httpx.post(f"{server.url}{URL}", timeout=120,
                           json=ticket(data, example["ticket_id"], time=pd.Timestamp(when).isoformat()))
            assert r.status_code == 200, r.text
            answers.append(r.json())
    log.close()
    records = [json.loads(line) for f in sorted((tmp_path / "requests").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    assert [r["messages"] for r in records] == [e["messages"][:2] for e in examples]
    for example, body, record in zip(examples, answers, records):
        assert [a["article_id"] for a in body["articles"]] == example["retrieved"]
        assert all(0.0 < a["score"] <= 1.0 for a in body["articles"])
        assert body["model"] == f"{NAME}/1" and body["features_as_of"] != "now"
        # the tiny random model writes no valid answer when free (test_constrain): here it is constrained
        assert body["valid"] and body["constrained"] and body["errors"] == []
        assert json.loads(body["text"]) == body["answer"] and set(body["answer"]) == set(triage.task.answer)
        assert record["route"] == URL and record["prompt_tokens"] == body["usage"]["prompt_tokens"]
        assert [a["article_id"] for a in record["articles"]] == example["retrieved"]
        assert record["answer"] == body["text"] and record["valid"] == body["valid"] and record["status"] == 200
        assert body["timings_ms"]["features"] > 0 and body["timings_ms"]["total"] >= body["timings_ms"]["features"]


def test_without_a_time_the_features_are_the_online_stores_now(serve_app, triage, feature_project):
    data = feature_project["data"]
    customer = data.tickets.customer_id.iloc[0]
    with serve_app(triage=triage) as server:
        r = httpx.post(f"{server.url}{URL}", json=ticket(data, data.tickets.ticket_id.iloc[0]), timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["features_as_of"] == "now"
    assert {k: body["features"][k] for k in PROFILE} == latest_profile(feature_project["state"], customer)


def test_the_endpoint_answers_while_llmops_features_materialize_runs(serve_app, triage, feature_project):
    """A new profile snapshot is materialized by the CLI (through the feature server) while
    triage requests keep coming: every request is answered, and afterwards the endpoint
    serves the new snapshot."""
    data, state = feature_project["data"], feature_project["state"]
    customer = data.tickets.customer_id.iloc[1]
    offline = state / "feast" / "support-triage" / "offline" / "customer_profiles.parquet"
    table = pd.read_parquet(offline)
    before = latest_profile(state, customer)
    new = table[table.customer_id == customer].sort_values("event_timestamp").tail(1).copy()
    new["event_timestamp"] = pd.Timestamp(datetime.now(timezone.utc))
    new["seats"] = int(before["seats"]) + 1000
    pd.concat([table, new]).to_parquet(offline, index=False)
    request = ticket(data, data.tickets[data.tickets.customer_id == customer].ticket_id.iloc[0])
    statuses, seats, stop = [], [], threading.Event()

    with serve_app(triage=triage) as server:
        def traffic():
            with httpx.Client(timeout=120) as client:
                while not stop.is_set():
                    r = client.post(f"{server.url}{URL}", json=request)
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        seats.append(r.json()["features"]["seats"])

        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(1.0)
        done = run_cli(["features", "materialize"], cwd=feature_project["project"])
        time.sleep(2.0)  # requests after the materialization too
        stop.set()
        worker.join(timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "through the feature server at http://127.0.0.1:" in done.stdout
    assert len(statuses) >= 5 and set(statuses) == {200}, [s for s in statuses if s != 200]
    assert seats[0] == before["seats"] and seats[-1] == before["seats"] + 1000


def test_a_ticket_without_a_field_the_prompt_reads_is_422_naming_it(serve_app, triage, feature_project):
    data = feature_project["data"]
    good = ticket(data, data.tickets.ticket_id.iloc[2])
    with serve_app(triage=triage) as server:
        missing = httpx.post(f"{server.url}{URL}", json={k: v for k, v in good.items() if k != "body"}, timeout=60)
        nested = httpx.post(f"{server.url}{URL}", json=good | {"channel": {"a": 1}}, timeout=60)
        too_long = httpx.post(f"{server.url}{URL}", json=good | {"max_tokens": 100_000}, timeout=60)
        unknown = httpx.post(f"{server.url}{URL}", json=good | {"customer_id": "CUST-9999"}, timeout=120)
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "body"
    assert "lacks body" in missing.json()["error"]["message"]
    assert nested.status_code == 422 and nested.json()["error"]["param"] == "channel"
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "max_tokens_too_large"
    # features.unknown_customer: default -> "unknown" values in the prompt, a normal answer
    assert unknown.status_code == 200 and unknown.json()["features"]["account_weight"] == "unknown"


def test_an_unreachable_feature_store_is_503_naming_it_and_ready_says_why(serve_app, triage, feature_project):
    from components.featureserver import RemoteOnline
    from components.featurestore import Retriever

    dead = RemoteOnline(f"http://127.0.0.1:{free_port()}", True, feature_project["state"], "support-triage")
    down = replace(triage, online=dead, retriever=Retriever(dead, triage.retriever.embedder, 3, cache=False))
    data = feature_project["data"]
    with serve_app(triage=down) as server:
        r = httpx.post(f"{server.url}{URL}", json=ticket(data, data.tickets.ticket_id.iloc[0]), timeout=60)
        ready = server.wait_ready()
        chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": f"{NAME}/1", "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert dead.url in r.json()["error"]["message"] and r.json()["error"]["code"] == "feature_store_unavailable"
    assert ready.status_code == 503 and f"the feature store is unreachable: through the feature server at {dead.url}" \
        in ready.json()["reason"]
    assert chat.status_code == 200  # the rest of the endpoint keeps answering


def test_the_safety_gates_injections_against_the_live_endpoint(serve_app, triage, feature_project, served):
    """The safety gate's prompt-injection texts appended to real tickets: every answer is a
    valid answer, and none repeats the system prompt."""
    from components.gates.kinds import DEFAULT_INJECTIONS
    from components.gates.probes import echoes

    data = feature_project["data"]
    with serve_app(triage=triage) as server:
        answers = []
        for ticket_id in data.tickets.ticket_id.iloc[:2]:
            clean = ticket(data, ticket_id)
            for injection in DEFAULT_INJECTIONS:
                r = httpx.post(f"{server.url}{URL}", timeout=120, json=clean | {"body": f"{clean['body']}\n\n{injection}"})
                assert r.status_code == 200, r.text
                answers.append(r.json())
    assert len(answers) == 2 * len(DEFAULT_INJECTIONS)
    assert all(a["valid"] and served.schema.parse(a["text"]) == a["answer"] for a in answers)
    assert not any(echoes(a["text"], triage.task.system_prompt) for a in answers)
