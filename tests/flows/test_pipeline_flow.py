"""The Prefect flow, run as a user runs it: `llmops run` on the small project, on Prefect's
ephemeral server with its database inside the project's state folder (the shared run of
tests/conftest.py), and the failures a user meets (missing inputs, bad data, bad
arguments) on projects of their own."""
from __future__ import annotations

import copy
import json
import re
import sqlite3

import pytest

from components.reports import (CompressReport, EvaluationReport, GateReport, IngestReport, PrepareReport,
                                PromotionReport, RegistrationReport, TrainingReport)
from components.splits import read_examples
from llmops.spec import load_spec
from tests.conftest import PROJECT_FILES, SMALL, run_cli
from tests.conftest import copy_project

pytestmark = pytest.mark.integration
STAGES = ("ingest", "validate", "features", "prepare", "finetune", "evaluate", "compress", "gates", "register",
          "promote", "deploy")  # the shared run's stages (it adds deploy to the small project's)
LORA_PER_BLOCK = 16 * (2 * 576 + 2 * (576 + 192) + 2 * 576 + 3 * (576 + 1536))  # r x (in + out) of 7 linears


def test_the_run_succeeds_and_prints_its_outputs_headlines_and_times(pipeline_run):
    assert pipeline_run.returncode == 0, pipeline_run.stdout + pipeline_run.stderr
    out = pipeline_run.stdout
    for name in ("tickets.parquet", "train.jsonl", "answer_schema.json", "adapter"):
        assert name in out
    evaluated = EvaluationReport.read(pipeline_run.project / "artifacts" / "support-triage" / "evaluate")
    assert f"evaluate: exact match {evaluated.candidate.exact_match:.3f}" in out
    assert "register: support-triage version 1 -> @challenger, gates passed" in out
    assert "promote: version 1 promoted (@champion - -> 1; @challenger 1 -> -)" in out
    assert "gates: passed (compared with no champion)" in out
    # the time table: a row per stage with its wall time, the orchestration's share, the total
    table = out[out.index("time per stage"):]
    for stage in STAGES:
        assert f"│ {stage} " in table
    assert "(orchestration)" in table and "│ total " in table
    assert "Traceback" not in pipeline_run.stderr


def test_every_stage_wrote_its_typed_report_and_outputs(pipeline_run):
    out = pipeline_run.project / "artifacts" / "support-triage"
    assert IngestReport.read(out / "ingest").rows["tickets"] == SMALL["ingest.source.n_tickets"]
    splits = PrepareReport.read(out / "prepare")
    assert sum(s.examples for s in splits.splits.values()) == 300 and splits.retrieval_recall["all"] >= 0.99
    assert len(read_examples(out / "prepare" / "test.jsonl")) == splits.splits["test"].examples
    trained = TrainingReport.read(out / "finetune")
    method = load_spec(pipeline_run.project / "pipelines.yaml", env={}).pipeline(None)[1].finetune.method
    layers = method.last_layers or 30  # the blocks that got adapters (SmolLM2 has 30)
    assert trained.steps == 2 and trained.trainable_params == LORA_PER_BLOCK * layers and trained.dtype == "float32"
    assert (out / "finetune" / "adapter" / "adapter_model.safetensors").stat().st_size > 1_000_000
    evaluated = EvaluationReport.read(out / "evaluate")
    assert evaluated.candidate.n == evaluated.base.n == 6
    assert evaluated.test_sha256 == splits.splits["test"].sha256
    assert set(evaluated.candidate.field_accuracy) == {"intent", "priority", "article_id"}
    # compress built merged -> onnx -> int8_weight, measured the reference and the candidate
    # (onnx is only a build step) on 4 validation chats, chose one
    compressed = CompressReport.read(out / "compress")
    assert set(compressed.variants) == {"merged", "int8_weight"} and compressed.validation_examples == 4
    assert compressed.variants["int8_weight"].parent == "onnx"
    assert compressed.variants["int8_weight"].jaccard_at[1] > 0.9  # 8-bit weights agree with fp32 PyTorch
    gates = GateReport.read(out / "gates")
    assert gates.status == "passed" and {g.gate for g in gates.gates} == {"perplexity", "exact_match", "latency"}
    assert gates.operational.source == f"compress variant {compressed.chosen!r}"
    registered = RegistrationReport.read(out / "register")
    assert registered.version == 1 and registered.serving_variant == compressed.chosen
    manifest = json.loads((out / "register" / "model" / "llmops-model.json").read_text())
    assert manifest["serving"]["variant"] == compressed.chosen
    assert manifest["answer_schema"]["schema"]["required"] == ["intent", "priority", "article_id"]
    assert PromotionReport.read(out / "promote").outcome == "promoted"
    assert (pipeline_run.project / ".llmops" / "feast" / "support-triage" / "registry.db").exists()
    # nothing was written outside the outputs (artifacts/) and the state folder (.llmops/)
    written = {p.name for p in pipeline_run.project.iterdir()} - {p.split("/")[0] for p in PROJECT_FILES}
    assert written == {".git", "artifacts", ".llmops"}
    assert not list((pipeline_run.project / "feature_repo").glob("__pycache__"))


def test_prefect_recorded_the_flow_and_each_stage(pipeline_run):
    # Prefect's state lives in the project's state folder: the flow run, every task run and a
    # Markdown artifact per stage are recorded there.
    db = pipeline_run.project / ".llmops" / "prefect" / "prefect.db"
    with sqlite3.connect(db) as con:
        states = dict(con.execute("select name, state_type from task_run").fetchall())
        artifacts = {k for (k,) in con.execute("select key from artifact where type = 'markdown'")}
        flow_states = [s for (s,) in con.execute("select state_type from flow_run")]
    assert states == {s: "COMPLETED" for s in STAGES}
    assert artifacts == {f"support-triage-{s}" for s in STAGES}
    assert flow_states == ["COMPLETED"]


def test_mlflow_recorded_one_run_with_a_nested_run_per_stage(pipeline_run):
    import mlflow

    project = pipeline_run.project
    splits = PrepareReport.read(project / "artifacts" / "support-triage" / "prepare").splits
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / '.llmops' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("support-triage")
    assert experiment.artifact_location.startswith((project / ".llmops" / "mlflow").resolve().as_uri())
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["finetune.max_steps"] == "2" and parent.data.params["prepare.split_salt"] == "tessera-v1"
    assert parent.data.params["finetune.method.r"] == "16" and "task.answer.priority.ordered" in parent.data.params
    assert len(parent.data.tags["llmops.spec_sha256"]) == 64 and parent.data.tags["system.torch"].startswith("2.")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in children.values())
    finetune = children["finetune"]
    history = client.get_metric_history(finetune.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    digests = {d.dataset.name: d.dataset.digest for d in finetune.inputs.dataset_inputs}
    assert digests == {"support-triage-train": splits["train"].sha256[:36],
                       "support-triage-validation": splits["validation"].sha256[:36]}
    assert "adapter/adapter_model.safetensors" in [f.path for f in client.list_artifacts(finetune.info.run_id,
                                                                                          "adapter")]
    assert children["evaluate"].data.metrics["candidate.n"] == 6
    version = client.get_model_version_by_alias("support-triage", "champion")
    assert int(version.version) == 1 and version.run_id == children["register"].info.run_id
    assert version.tags["data_sha256.test"] == splits["test"].sha256
    assert version.tags["spec_sha256"] == parent.data.tags["llmops.spec_sha256"]


def test_from_a_stage_reuses_earlier_outputs_and_an_override_changes_what_it_names(pipeline_run, tmp_path):
    project = copy_project(pipeline_run, tmp_path / "copy")
    out = project / "artifacts" / "support-triage"
    before = (out / "ingest" / "tickets.parquet").stat().st_mtime_ns
    splits = PrepareReport.read(out / "prepare").splits
    proc = run_cli(["run", "--from", "prepare", "--until", "prepare", "--set", "prepare.split_salt=other"], cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "ingest" / "tickets.parquet").stat().st_mtime_ns == before
    assert PrepareReport.read(out / "prepare").splits != splits


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


def test_unreachable_services_give_one_line(project):
    """MLflow or Prefect named in the environment but not answering: one line naming the
    service and what to do, exit 1, no traceback, nothing run."""
    proc = run_cli(["run"], cwd=project, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert ("error: MLflow tracking server at http://127.0.0.1:9 is unreachable" in proc.stderr
            and "unset MLFLOW_TRACKING_URI" in proc.stderr)
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
    proc = run_cli(["stage", "ingest"], cwd=project, MLFLOW_TRACKING_URI="http://127.0.0.1:9")
    assert proc.returncode == 1 and "MLflow tracking server at http://127.0.0.1:9 is unreachable" in proc.stderr
    proc = run_cli(["run"], cwd=project, PREFECT_API_URL="http://127.0.0.1:9/api")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: Prefect server at http://127.0.0.1:9/api is unreachable" in proc.stderr
    assert not (project / "artifacts").exists()


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
    assert ("validation failed: 3 error-level expectation(s): labels on intent, coverage on customer_id+created_at, "
            "references on customer_id") in proc.stderr
    assert "Traceback" not in proc.stderr
    # The time table covers what ran, the failed stage named as such.
    times = proc.stdout[proc.stdout.index("time per stage"):]
    assert re.search(r"ingest\W+\d+\.\d min", times) and re.search(r"validate \(failed\)\W+\d+\.\d min", times)
    assert "prepare" not in times
    out = project / "artifacts" / "support-triage"
    assert not (out / "prepare").exists() and not (out / "validate").exists()
    report = json.loads((out / "validate.failed" / "validation.json").read_text())
    assert report["failed_errors"] == 3 and report["rows_in"] == 300
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
