"""Gated promotion as a user meets it, on a copy of the shared run (whose version 1 became
champion): a weak second run is refused by its gates, a forced promotion needs a reason,
rollback restores the champion."""
from __future__ import annotations

import sqlite3

import mlflow
import pytest

from components.reports import GateReport, PromotionReport
from tests.conftest import run_cli
from tests.conftest import ENFORCE, ENV, TRAINING, copy_project

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def weak_run(pipeline_run, tmp_path_factory):
    """A copy of the shared run, then a deliberately weak configuration: one training step.
    The second run leaves compress out (the registered version is then base + adapter): the
    gates refuse it on perplexity either way, and compressing it again costs a minute."""
    assert pipeline_run.returncode == 0, pipeline_run.stdout + pipeline_run.stderr
    project = copy_project(pipeline_run, tmp_path_factory.mktemp("promotion") / "project")
    stages = ",".join(s for s in TRAINING if s != "compress")
    proc = run_cli(["run", "--from", "finetune", *ENFORCE, "--set", "finetune.max_steps=1",
                    "--set", f"stages=[{stages}]"], cwd=project, **ENV)
    return project, proc


def client_of(project):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / '.llmops' / 'mlflow' / 'mlflow.db'}")


def aliases(project) -> dict[str, int]:
    return {a: int(v) for a, v in client_of(project).get_registered_model("support-triage").aliases.items()}


def test_the_first_run_became_champion(pipeline_run):
    assert aliases(pipeline_run.project) == {"champion": 1, "deployed-local": 1}  # the run's deploy stage
    v1 = client_of(pipeline_run.project).get_model_version("support-triage", "1")
    assert (v1.tags["gates.status"], v1.tags["promotion"]) == ("passed", "promoted")


def test_a_weak_run_fails_its_gates_and_changes_nothing(weak_run):
    project, proc = weak_run
    client = client_of(project)
    champion_ppl = float(client.get_model_version("support-triage", "1").tags["metric.perplexity"])
    weak_ppl = float(client.get_model_version("support-triage", "2").tags["metric.perplexity"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert weak_ppl > champion_ppl
    assert (f"gates failed: perplexity (perplexity {weak_ppl:g} <= {champion_ppl:g}, "
            f"margin {round(champion_ppl - weak_ppl, 6):g}). support-triage version 2 stays challenger; "
            "champion v1 unchanged") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "gates: failed (compared with champion v1)" in proc.stdout  # the table, before the error
    assert aliases(project) == {"champion": 1, "challenger": 2, "deployed-local": 1}
    v2 = client.get_model_version("support-triage", "2")
    assert (v2.tags["gates.status"], v2.tags["gates.failed"], v2.tags["promotion"]) == ("failed", "perplexity",
                                                                                        "refused")
    out = project / "artifacts" / "support-triage"
    report = GateReport.read(out / "gates")
    assert report.failed == ["perplexity"] and report.champion == "champion v1"
    assert PromotionReport.read(out / "promote.failed").outcome == "refused"
    with sqlite3.connect(project / ".llmops" / "prefect" / "prefect.db") as con:
        states = [s for (s,) in con.execute("select state_type from task_run where name = 'promote' "
                                            "order by created")]
    assert states == ["COMPLETED", "FAILED"]  # the shared run's, then this one's
    gates_run = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id],
                                   "attributes.run_name = 'gates'", order_by=["attributes.start_time DESC"])[0]
    assert gates_run.data.tags["gates.status"] == "failed" and gates_run.data.tags["gate.perplexity"] == "failed"


def test_forcing_needs_a_reason_and_rollback_restores(weak_run, tmp_path):
    project = weak_run[0]
    forced = run_cli(["promote", "2", "--force"], cwd=project, **ENV)
    assert forced.returncode == 2 and "--force needs --reason" in forced.stderr
    assert aliases(project) == {"champion": 1, "challenger": 2, "deployed-local": 1}
    refused = run_cli(["promote", "2", "--reason", "try it"], cwd=project, **ENV)
    assert refused.returncode == 1 and "gates failed (perplexity); not promoted" in refused.stderr
    forced = run_cli(["promote", "2", "--force", "--reason", "trying the 1-step model"], cwd=project, **ENV)
    assert forced.returncode == 0, forced.stderr
    assert aliases(project) == {"champion": 2, "previous": 1, "deployed-local": 1}
    back = run_cli(["rollback", "--reason", "perplexity regression"], cwd=project, **ENV)
    assert back.returncode == 0, back.stderr
    assert "@champion: 2 -> 1  by release-bot" in back.stdout
    assert aliases(project) == {"champion": 1, "rolled_back": 2, "deployed-local": 1}
    listing = run_cli(["models", "list"], cwd=project, **ENV)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 5}
    assert "champion" in rows["1"] and "passed" in rows["1"]
    assert "rolled_back" in rows["2"] and "failed (perplexity)" in rows["2"]
