"""Feedback on served answers through a live endpoint (POST /v1/feedback, real HTTP, API
keys), then `llmops data from-traffic` (the CLI) turning the request log and the feedback
into a labelled table versioned with DVC, and `llmops stage ingest` adding it beside the
demo data; the same through S3 (moto's server)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import boto3
import httpx
import pandas as pd
import pytest
import yaml

from components import generate
from serving.records import RequestLog, S3Shipper
from tests.conftest import make_project, run_cli
from tests.serving.conftest import NAME, grew, samples
from tests.serving.test_triage import ticket

KEY = "feedback-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
STORED = 'llmops_feedback_records_total{result="stored"}'
INVALID = 'llmops_feedback_records_total{result="invalid_answer"}'
# article ids the served (tiny) version's schema allows (tests/components/conftest.py ARTICLE_IDS)
CORRECT = [{"intent": "billing_refund", "priority": "urgent", "article_id": "KB-101"},
           {"intent": "login_problem", "priority": "low", "article_id": "KB-201"},
           {"intent": "performance", "priority": "high", "article_id": "KB-102"}]


def triaged(server, data, ticket_ids: list[str], headers: dict | None = None) -> list[dict]:
    answers = []
    for ticket_id in ticket_ids:
        r = httpx.post(f"{server.url}/v1/triage", json=ticket(data, ticket_id), headers=headers or {}, timeout=120)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return answers


def feedback(server, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/feedback", json=body, headers=AUTH if headers is None else headers,
                      timeout=30)


def test_feedback_becomes_a_versioned_table_that_ingest_adds_beside_the_data(serve_app, triage, feature_project,
                                                                             tmp_path):
    data = feature_project["data"]
    ids = list(data.tickets.ticket_id[:4])
    log_dir = tmp_path / "requests"
    log = RequestLog(log_dir)
    with serve_app(keys={"agents": KEY}, log=log, triage=triage) as server:
        answers = triaged(server, data, ids, AUTH)
        before = samples(server)
        first = {"request_id": answers[0]["id"], "answer": CORRECT[0], "who": "agent-17"}
        assert feedback(server, first, headers={}).json()["error"]["code"] == "missing_api_key"
        assert feedback(server, first, headers={"Authorization": "Bearer wrong-key-wrong-key"}).status_code == 401
        stored = [feedback(server, first),
                  feedback(server, {"request_id": answers[1]["id"], "answer": CORRECT[1], "who": "agent-3",
                                    "note": "a login problem, not billing"}),
                  feedback(server, first | {"answer": CORRECT[2], "who": "lead-1"}),  # later: this one wins
                  feedback(server, {"request_id": "triage-" + "0" * 32, "answer": CORRECT[0], "who": "agent-17"})]
        assert [r.status_code for r in stored] == [201] * 4, [r.text for r in stored]
        assert stored[0].json()["model"] == f"{NAME}/1" and stored[0].json()["id"].startswith("feedback-")
        bad = feedback(server, first | {"answer": CORRECT[0] | {"priority": "asap"}})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "answer.priority"
        assert "'asap' is not one of ['low', 'medium', 'high', 'urgent']" in bad.json()["error"]["message"]
        lacking = feedback(server, first | {"answer": {"intent": "bug_report", "priority": "low"}})
        assert lacking.status_code == 422 and lacking.json()["error"]["param"] == "answer"
        assert "'article_id' is a required property" in lacking.json()["error"]["message"]
        blank = feedback(server, first | {"who": "  "})
        assert blank.status_code == 422 and blank.json()["error"]["param"] == "who"
        assert feedback(server, {"request_id": answers[0]["id"], "answer": CORRECT[0]}).json()["error"]["param"] == "who"
        after = samples(server)
        assert grew(before, after, STORED) == 4 and grew(before, after, INVALID) == 2
        triaged(server, data, ids[3:], AUTH)  # still answering after the bad input
    log.close()
    [stored_file] = list(log_dir.glob("feedback-*.jsonl"))
    records = [json.loads(line) for line in stored_file.read_text().splitlines()]
    assert [r["feedback_id"] for r in records] == [r.json()["id"] for r in stored]
    assert records[1] | {"time": None} == {
        "feedback_id": stored[1].json()["id"], "time": None, "request_id": answers[1]["id"], "answer": CORRECT[1],
        "who": "agent-3", "note": "a login problem, not billing", "model": f"{NAME}/1", "variant": answers[1]["variant"],
        "key_id": "agents"}

    project = make_project(tmp_path / "project")
    made = run_cli(["data", "from-traffic", "--log", str(log_dir), "--hours", "2"], cwd=project, COLUMNS="200")
    assert made.returncode == 0, made.stdout + made.stderr
    lines = made.stdout.splitlines()
    assert lines[0].startswith(f"window: 5 /v1/triage requests ({NAME}/1: 5; last 2 h; ")
    assert lines[0].endswith(f") from {log_dir}; 4 feedback records since then")
    assert "joined: 2 requests labelled by feedback; 3 requests in the window without feedback" in lines
    assert "skipped 1: superseded by later feedback for the same request" in lines
    assert f"  {stored[0].json()['id']} (request {answers[0]['id']})" in lines
    assert "skipped 1: request not in the window" in lines
    tickets = pd.read_parquet(project / "data" / "traffic" / "tickets.parquet")
    origin = pd.read_parquet(project / "data" / "traffic" / "origin.parquet")
    assert list(tickets.columns) == list(data.tickets.columns)
    assert dict(tickets.dtypes.astype(str)) == dict(data.tickets.dtypes.astype(str))
    assert list(tickets.ticket_id) == [answers[1]["id"], answers[0]["id"]]  # in the order of their feedback
    original = data.tickets.set_index("ticket_id").loc[[ids[1], ids[0]]]
    for col in ("customer_id", "channel", "subject", "body"):
        assert list(tickets[col]) == list(original[col])
    assert tickets[["intent", "priority", "article_id"]].to_dict("records") == [CORRECT[1], CORRECT[2]]
    assert tickets.language.isna().all() and tickets.urgency.isna().all()
    logged = {r["request_id"]: r for f in log_dir.glob("requests-*.jsonl") for r in map(json.loads, f.read_text().splitlines())}
    assert list(tickets.created_at) == [pd.Timestamp(logged[t]["time"]) for t in tickets.ticket_id]
    assert list(origin.request_id) == list(tickets.ticket_id) and list(origin.client_ticket_id) == [ids[1], ids[0]]
    assert list(origin.model) == [f"{NAME}/1"] * 2 and list(origin.feedback_who) == ["agent-3", "lead-1"]
    assert list(origin.feedback_id) == [stored[1].json()["id"], stored[2].json()["id"]]
    assert list(origin.feedback_at) == [pd.Timestamp(records[1]["time"]), pd.Timestamp(records[2]["time"])]
    assert list(origin.served_answer) == [answers[1]["text"], answers[0]["text"]]
    assert list(origin.feedback_note) == ["a login problem, not billing", None]
    md5 = yaml.safe_load((project / "data" / "traffic.dvc").read_text())["outs"][0]["md5"]
    assert md5.endswith(".dir")
    assert f"versioned: dvc add data/traffic -> data/traffic.dvc (md5 {md5}); `git add data/traffic.dvc` " \
           "to commit this version" in lines
    assert lines[-1] == "retrain on it: llmops run --set 'ingest.extra=[data/traffic]'"

    ingested = run_cli(["stage", "ingest", "--set", "ingest.extra=[data/traffic]"], cwd=project)
    assert ingested.returncode == 0, ingested.stdout + ingested.stderr
    folder = project / "artifacts" / "support-triage" / "ingest"
    report = json.loads((folder / "metrics.json").read_text())
    assert report["tickets_by_origin"] == {"source": 300, "data/traffic": 2} and report["rows"]["tickets"] == 302
    [extra] = report["extra"]
    assert extra["dvc_md5"] == md5 and extra["models"] == {f"{NAME}/1": 2} and extra["rows"] == {"tickets": 2}
    all_tickets = pd.read_parquet(folder / "tickets.parquet")
    assert list(all_tickets.ticket_id[-2:]) == list(tickets.ticket_id)
    assert all_tickets.ticket_id[:300].str.startswith("TCK-").all()
    with sqlite3.connect(project / ".llmops" / "mlflow" / "mlflow.db") as db:
        run_id, = db.execute("SELECT run_uuid FROM runs WHERE name = 'ingest'").fetchone()
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)))
        metric, = db.execute("SELECT value FROM latest_metrics WHERE run_uuid = ? AND key = ?",
                             (run_id, "tickets_by_origin.data/traffic")).fetchone()
    assert tags["llmops.ingest.extra"] == f"data/traffic: 2 tickets (dvc md5 {md5})" and metric == 2.0


def test_feedback_goes_to_s3_with_the_log_and_from_traffic_reads_it_there(serve_app, triage, feature_project,
                                                                        s3_endpoint, tmp_path):
    data = feature_project["data"]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="traffic")
    uri = f"s3://traffic/logs/{NAME}"
    log = RequestLog(tmp_path / "requests", shipper=S3Shipper(uri, s3_endpoint, every_s=60))
    with serve_app(log=log, triage=triage) as server:
        answers = triaged(server, data, list(data.tickets.ticket_id[10:12]))
        r = feedback(server, {"request_id": answers[1]["id"], "answer": CORRECT[1], "who": "agent-3"}, headers={})
        assert r.status_code == 201, r.text
    log.close()  # ships what is left, the feedback file with it
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket="traffic", Prefix=f"logs/{NAME}/")["Contents"]]
    assert {k.split("/")[-1].split("-")[0] for k in keys} == {"feedback", "requests"}
    for path in (tmp_path / "requests").iterdir():
        path.unlink()  # what from-traffic reads is what S3 holds
    project = make_project(tmp_path / "project")
    made = run_cli(["data", "from-traffic", "--log", uri, "--last", "10", "--no-dvc"], cwd=project,
                   AWS_ENDPOINT_URL=s3_endpoint)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "joined: 1 requests labelled by feedback; 1 requests in the window without feedback" in made.stdout
    tickets = pd.read_parquet(project / "data" / "traffic" / "tickets.parquet")
    assert list(tickets.ticket_id) == [answers[1]["id"]] and tickets.iloc[0].subject == data.tickets.subject[11]
    assert tickets[["intent", "priority", "article_id"]].to_dict("records") == [CORRECT[1]]
    assert not (project / "data" / "traffic.dvc").exists()


@pytest.fixture
def small_log(tmp_path):
    """A request log of three triage requests as the endpoint writes it, no feedback yet."""
    folder = tmp_path / "requests"
    log = RequestLog(folder)
    tickets = generate.generate(n_tickets=3, n_customers=3, seed=5).tickets
    for n, row in enumerate(tickets.itertuples()):
        log.append({"request_id": f"triage-{n:032x}", "route": "/v1/triage", "model": f"{NAME}/2", "variant": "x",
                    "time": f"{pd.Timestamp.now(tz='UTC').isoformat(timespec='milliseconds')}", "status": 200,
                    "ticket": {"subject": row.subject, "body": row.body, "channel": row.channel,
                               "customer_id": row.customer_id},
                    "answer": json.dumps({"intent": row.intent, "priority": row.priority,
                                          "article_id": row.article_id})})
    log.close()
    return folder


def test_from_traffic_says_what_is_wrong_and_writes_nothing(small_log, tmp_path):
    from serving.feedback import FeedbackLog

    project = make_project(tmp_path / "project")
    missing = run_cli(["data", "from-traffic", "--log", str(tmp_path / "nowhere")], cwd=project)
    assert missing.returncode == 1 and f"request log {tmp_path / 'nowhere'}: no such folder" in missing.stderr
    other = run_cli(["data", "from-traffic", "--log", str(small_log), "--model", f"{NAME}/1"], cwd=project)
    assert other.returncode == 1 and f"no /v1/triage requests of {NAME}/1 in {small_log}" in other.stderr
    assert f"other versions: {{'{NAME}/2': 3}}" in other.stderr
    unlabelled = run_cli(["data", "from-traffic", "--log", str(small_log)], cwd=project)
    assert unlabelled.returncode == 1 and "no feedback stored beside" in unlabelled.stderr
    store = FeedbackLog(RequestLog(small_log))
    store.append({"feedback_id": "feedback-1", "time": pd.Timestamp.now(tz="UTC").isoformat(),
                  "request_id": f"triage-{0:032x}", "answer": {"intent": "refund", "priority": "low",
                                                               "article_id": "KB-101"}, "who": "agent-1"})
    refused = run_cli(["data", "from-traffic", "--log", str(small_log)], cwd=project)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "skipped 1: answer refused by the task's answer schema" in refused.stdout
    assert f"feedback-1 (request triage-{0:032x}): intent: 'refund' is not one of" in refused.stdout
    assert "nothing written" in refused.stderr and not (project / "data").exists()
    store.append({"feedback_id": "feedback-2", "time": pd.Timestamp.now(tz="UTC").isoformat(),
                  "request_id": f"triage-{2:032x}", "answer": {"intent": "bug_report", "priority": "high",
                                                               "article_id": "KB-301"}, "who": "agent-1"})
    store.log.close()
    written = run_cli(["data", "from-traffic", "--log", str(small_log), "--out", "data/t", "--no-dvc"], cwd=project)
    assert written.returncode == 0 and "joined: 1 requests labelled by feedback" in written.stdout, written.stderr
    again = run_cli(["data", "from-traffic", "--log", str(small_log), "--out", "data/t", "--no-dvc", "--append"],
                    cwd=project)
    assert again.returncode == 0 and "joined: 1 requests labelled by feedback" in again.stdout, again.stderr
    assert list(pd.read_parquet(project / "data" / "t" / "tickets.parquet").priority) == ["high"]
    outside = run_cli(["data", "from-traffic", "--log", str(small_log), "--out", str(tmp_path / "elsewhere")],
                      cwd=project)
    assert outside.returncode == 2 and "is outside the project" in outside.stderr
    assert Path(project / "data" / "t" / "origin.parquet").exists()
