"""The Prefect flow, run as a user runs it: `llmops run` in a project copy, on Prefect's
ephemeral server with its database inside the project's state folder."""
from __future__ import annotations

import copy
import json
import sqlite3

import pytest

from components.prepare import read_examples
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def test_run_ingest_then_prepare_in_ephemeral_prefect(project):
    proc = run_cli(["run"], cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = project / "artifacts" / "support-triage"
    assert json.loads((out / "ingest" / "metrics.json").read_text())["n_tickets"] == 300
    splits = json.loads((out / "prepare" / "splits.json").read_text())
    assert sum(s["examples"] for s in splits.values()) == 300
    assert len(read_examples(out / "prepare" / "test.jsonl")) == splits["test"]["examples"]
    # the run printed where every output went
    for name in ("tickets.parquet", "train.jsonl", "splits.json"):
        assert name in proc.stdout
    # Prefect's state lives in the project's state folder: the flow run, both task runs
    # and a Markdown artifact per stage are recorded there.
    db = project / ".llmops" / "prefect" / "prefect.db"
    assert db.exists()
    with sqlite3.connect(db) as con:
        states = dict(con.execute("select name, state_type from task_run").fetchall())
        artifacts = {k for (k,) in con.execute("select key from artifact where type = 'markdown'")}
        flow_states = [s for (s,) in con.execute("select state_type from flow_run")]
    assert states == {"ingest": "COMPLETED", "validate": "COMPLETED", "features": "COMPLETED",
                      "prepare": "COMPLETED", "finetune": "COMPLETED"}
    assert artifacts == {"support-triage-ingest", "support-triage-validate", "support-triage-features",
                         "support-triage-prepare", "support-triage-finetune"}
    # the real base model was fine-tuned (2 steps) and its adapter saved as safetensors
    trained = json.loads((out / "finetune" / "metrics.json").read_text())
    assert trained["steps"] == 2 and trained["trainable_params"] == 4_884_480
    assert (out / "finetune" / "adapter" / "adapter_model.safetensors").stat().st_size > 10_000_000
    assert (project / ".llmops" / "feast" / "support-triage" / "registry.db").exists()
    assert json.loads((out / "prepare" / "metrics.json").read_text())["retrieval_recall_at_3"] >= 0.99
    assert json.loads((out / "validate" / "validation.json").read_text())["success"] is True
    assert flow_states == ["COMPLETED"]

    # --from prepare reuses ingest's outputs; an override changes only what it names
    before = (out / "ingest" / "tickets.parquet").stat().st_mtime_ns
    proc = run_cli(["run", "--from", "prepare", "--set", "prepare.split_salt=other"], cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "ingest" / "tickets.parquet").stat().st_mtime_ns == before
    assert json.loads((out / "prepare" / "splits.json").read_text()) != splits


def test_from_a_stage_whose_inputs_are_missing_fails_clearly(project):
    proc = run_cli(["run", "--from", "prepare"], cwd=project)
    assert proc.returncode == 1
    assert "stage 'prepare' needs the outputs of 'validate'" in proc.stderr
    assert "llmops run --until validate" in proc.stderr
    proc = run_cli(["run", "--from", "features"], cwd=project)
    assert proc.returncode == 1 and "stage 'features' needs the outputs of 'validate'" in proc.stderr
    assert not (project / "artifacts" / "support-triage" / "prepare").exists()


def test_failing_stage_keeps_the_previous_outputs(project):
    assert run_cli(["stage", "ingest"], cwd=project).returncode == 0
    tickets = project / "artifacts" / "support-triage" / "ingest" / "tickets.parquet"
    before = tickets.read_bytes()
    proc = run_cli(["stage", "ingest", "--set", f"ingest.source={{kind: files, uri: {project / 'missing'}}}"],
                   cwd=project)
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert tickets.read_bytes() == before
    assert not (project / "artifacts" / "support-triage" / "ingest.partial").exists()


def test_bad_stage_selection(project):
    proc = run_cli(["run", "--until", "deploy"], cwd=project)
    assert proc.returncode == 2
    assert "--until 'deploy': not a stage of this pipeline (stages: ingest, validate, features, prepare, finetune)" in proc.stderr


def write_bad_dataset(folder, data):
    """The demo tables as JSONL, with an unknown intent and a ticket from an unknown customer."""
    folder.mkdir(parents=True)
    data = copy.deepcopy(data)
    data.tickets.loc[3, "intent"] = "complaint"
    data.tickets.loc[4, "customer_id"] = "CUST-0999"
    for name in data.TABLES:
        getattr(data, name).to_json(folder / f"{name}.jsonl", orient="records", lines=True, date_format="iso")
    return folder


def test_bad_data_stops_the_flow_at_validate(project, demo_small):
    bad = write_bad_dataset(project / "incoming", demo_small)
    proc = run_cli(["run", "--set", f"ingest.source={{kind: files, uri: {bad}}}"], cwd=project)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "validation failed: 2 error-level expectation(s): labels on intent, references on customer_id" in proc.stderr
    assert "Traceback" not in proc.stderr
    out = project / "artifacts" / "support-triage"
    assert not (out / "prepare").exists() and not (out / "validate").exists()
    report = json.loads((out / "validate.failed" / "validation.json").read_text())
    assert report["failed_errors"] == 2 and report["rows_in"] == 300
    assert (out / "validate.failed" / "data_docs" / "index.html").exists()
    db = project / ".llmops" / "prefect" / "prefect.db"
    with sqlite3.connect(db) as con:
        states = dict(con.execute("select name, state_type from task_run").fetchall())
    assert states == {"ingest": "COMPLETED", "validate": "FAILED"}
    assert not (project / ".llmops" / "mlflow").exists()  # nothing trained or registered
