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
STAGES = ("ingest", "validate", "features", "prepare", "finetune", "evaluate", "compress", "gates", "register",
          "promote")


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
    assert states == {s: "COMPLETED" for s in STAGES}
    assert artifacts == {f"support-triage-{s}" for s in STAGES}
    # the real base model was fine-tuned (2 steps) and its adapter saved as safetensors
    trained = json.loads((out / "finetune" / "metrics.json").read_text())
    assert trained["steps"] == 2 and trained["trainable_params"] == 4_884_480
    assert (out / "finetune" / "adapter" / "adapter_model.safetensors").stat().st_size > 10_000_000
    assert (project / ".llmops" / "feast" / "support-triage" / "registry.db").exists()
    assert json.loads((out / "prepare" / "metrics.json").read_text())["retrieval_recall_at_3"] >= 0.99
    assert json.loads((out / "validate" / "validation.json").read_text())["success"] is True
    assert flow_states == ["COMPLETED"]
    # the evaluation ran both models on the (cut) test split; the run printed the headline
    evaluated = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert evaluated["candidate"]["n"] == evaluated["base"]["n"] == 6
    assert evaluated["test_sha256"] == splits["test"]["sha256"]
    assert f"evaluate: exact match {evaluated['candidate']['exact_match']:.3f}" in proc.stdout
    assert "register: support-triage version 1 -> @challenger" in proc.stdout
    # compress built merged -> onnx -> int8_weight, measured each on 4 validation chats, chose one,
    # and the registered version holds it
    compressed = json.loads((out / "compress" / "metrics.json").read_text())
    assert set(compressed["variants"]) == {"merged", "onnx", "int8_weight"}
    assert compressed["validation_examples"] == 4 and compressed["chosen"] in compressed["variants"]
    assert compressed["variants"]["onnx"]["jaccard_at_1"] > 0.99  # fp32 ONNX agrees with PyTorch
    assert f"compress: chose {compressed['chosen']}" in proc.stdout
    manifest = json.loads((out / "register" / "model" / "llmops-model.json").read_text())
    assert manifest["serving"]["variant"] == compressed["chosen"]
    assert (out / "register" / "model" / "serving" / "variant.json").exists()
    check_mlflow(project, splits)

    # --from prepare reuses ingest's outputs; an override changes only what it names
    before = (out / "ingest" / "tickets.parquet").stat().st_mtime_ns
    proc = run_cli(["run", "--from", "prepare", "--set", "prepare.split_salt=other"], cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "ingest" / "tickets.parquet").stat().st_mtime_ns == before
    assert json.loads((out / "prepare" / "splits.json").read_text()) != splits


def check_mlflow(project, splits):
    """One MLflow run for the pipeline run, a nested run per stage, what each logged, and
    the registered version, read back from the project's SQLite store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / '.llmops' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("support-triage")
    assert experiment.artifact_location.startswith((project / ".llmops" / "mlflow").resolve().as_uri())
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["finetune.max_steps"] == "2" and parent.data.params["prepare.split_salt"] == "tessera-v1"
    assert parent.data.params["finetune.method.r"] == "16"
    assert len(parent.data.tags["llmops.spec_sha256"]) == 64 and parent.data.tags["system.torch"].startswith("2.")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in children.values())
    finetune = children["finetune"]
    history = client.get_metric_history(finetune.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert {m.key for m in client.get_metric_history(finetune.info.run_id, "tokens_per_s")} == {"tokens_per_s"}
    digests = {d.dataset.name: d.dataset.digest for d in finetune.inputs.dataset_inputs}
    assert digests == {"support-triage-train": splits["train"]["sha256"][:36],
                       "support-triage-validation": splits["validation"]["sha256"][:36]}
    assert "adapter/adapter_model.safetensors" in [f.path for f in client.list_artifacts(finetune.info.run_id,
                                                                                          "adapter")]
    assert children["evaluate"].data.metrics["candidate.n"] == 6
    version = client.get_model_version_by_alias("support-triage", "challenger")
    assert int(version.version) == 1 and version.run_id == children["register"].info.run_id
    assert version.tags["data_sha256.test"] == splits["test"]["sha256"]
    assert version.tags["spec_sha256"] == parent.data.tags["llmops.spec_sha256"]


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
    assert ("--until 'deploy': not a stage of this pipeline (stages: ingest, validate, features, prepare, "
            "finetune, evaluate, compress, gates, register, promote)") in proc.stderr


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
    # MLflow: the pipeline's run and validate's run FAILED, nothing trained or registered
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / '.llmops' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("ingest", "FINISHED"), ("support-triage", "FAILED"), ("validate", "FAILED")]
    assert client.search_registered_models() == []
