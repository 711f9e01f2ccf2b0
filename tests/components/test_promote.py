"""promote and the registry's aliases on a real MLflow registry (SQLite in a temp folder),
with versions registered by the register stage: champion/previous moves, refusals that
change nothing, rollback, the audit log, and the commands around them."""
from __future__ import annotations

import json

import mlflow
import pytest

from components import registry
from components.base import StageError, StageIO
from components.promote import PromoteSpec
from components.promote import run as promote
from components.reports import GateReport, RegistrationReport
from tests.conftest import REPO, register_run, run_cli, sqlite_registry

NAME = "triage-promote"


def gate_report(tiny_run, status: str) -> GateReport:
    failed = [] if status == "passed" else ["exact_match"]
    return GateReport.model_validate({
        "status": status, "failed": failed, "champion": "no champion", "model_name": NAME,
        "test_sha256": tiny_run["splits"]["test"]["sha256"],
        "gates": [{"gate": "exact_match", "kind": "absolute", "metric": "exact_match", "observed": 0.5, "op": ">=",
                   "threshold": 0.8 if failed else 0.4, "margin": -0.3 if failed else 0.1, "passed": not failed}]})


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPS_ACTOR", "ci-bot")
    with sqlite_registry(tmp_path) as uri:
        yield uri


def new_version(tiny_run, folder, status: str) -> StageIO:
    """Register the tiny adapter with a gate report of ``status``; returns the IO promote
    reads (the gate report and the registration)."""
    gate_report(tiny_run, status).write(folder / "gates")
    registered = register_run(tiny_run, folder / "register", NAME, {"gates": folder / "gates"})
    registered.report.write(folder / "register")  # what the runner does after every stage
    (folder / "promote").mkdir()
    return StageIO(pipeline="t", out_dir=folder / "promote", inputs={"gates": folder / "gates",
                                                                      "register": folder / "register"},
                   context={"mlflow_run_id": "r1"})


def test_register_tags_the_gate_outcome(tiny_run, store, tmp_path):
    new_version(tiny_run, tmp_path / "a", "passed")
    new_version(tiny_run, tmp_path / "b", "failed")
    client = mlflow.MlflowClient()
    one, two = (client.get_model_version(NAME, v) for v in ("1", "2"))
    assert one.tags["gates.status"] == "passed" and one.tags["gates.failed"] == ""
    assert two.tags["gates.status"] == "failed" and two.tags["gates.failed"] == "exact_match"
    assert float(two.tags["metric.perplexity"]) > 0  # champion gates compare it
    registration = RegistrationReport.read(tmp_path / "b" / "register")
    assert registration.gates_status == "failed" and len(registration.gates_sha256) == 64
    assert json.loads((tmp_path / "b" / "register" / "model" / "gates.json").read_text())["status"] == "failed"
    assert "## Gates: failed" in (tmp_path / "b" / "register" / "model" / "README.md").read_text()


def test_passed_gates_promote_failed_gates_change_nothing(tiny_run, store, tmp_path):
    client = mlflow.MlflowClient()
    result = promote(PromoteSpec(), new_version(tiny_run, tmp_path / "a", "passed"))
    assert (result.report.outcome, result.report.version) == ("promoted", 1)
    assert registry.aliases(client, NAME) == {"champion": 1}  # no longer challenger
    log = registry.audit_log(client, NAME)
    assert [(e["action"], e["alias"], e["from"], e["to"], e["by"]) for e in log] == [
        ("register", "challenger", None, 1, "ci-bot"), ("promote", "champion", None, 1, "ci-bot"),
        ("promote", "challenger", 1, None, "ci-bot")]
    assert log[1]["why"] == "all 1 gates passed (run r1)" and log[1]["at"].endswith("+00:00")
    assert log[0]["why"].startswith("registered by run ")

    io = new_version(tiny_run, tmp_path / "b", "failed")
    before = registry.audit_log(client, NAME)
    with pytest.raises(StageError) as err:
        promote(PromoteSpec(), io)
    assert str(err.value) == ("gates failed: exact_match (exact_match 0.5 >= 0.8, margin -0.3). "
                              f"{NAME} version 2 stays challenger; champion v1 unchanged")
    assert registry.aliases(client, NAME) == {"champion": 1, "challenger": 2}
    assert registry.audit_log(client, NAME) == before  # nothing moved, nothing recorded as moved
    assert client.get_model_version(NAME, "2").tags["promotion"] == "refused"

    # warn mode: the same refusal is recorded and the stage succeeds
    io = new_version(tiny_run, tmp_path / "c", "failed")
    result = promote(PromoteSpec(mode="warn"), io)
    assert (result.report.outcome, result.report.version) == ("refused", 3)
    assert result.report.failed_gates == ["exact_match"]
    assert registry.aliases(client, NAME) == {"champion": 1, "challenger": 3}

    # the next good version: champion moves, the old one is kept as previous
    promote(PromoteSpec(), new_version(tiny_run, tmp_path / "d", "passed"))
    assert registry.aliases(client, NAME) == {"champion": 4, "previous": 1}  # 4 was the challenger


def test_a_report_changed_after_register_is_refused(tiny_run, store, tmp_path):
    io = new_version(tiny_run, tmp_path / "a", "failed")
    gate_report(tiny_run, "passed").write(io.inputs["gates"])
    with pytest.raises(StageError, match="not the gate report triage-promote version 1 was registered with"):
        promote(PromoteSpec(), io)
    assert "champion" not in registry.aliases(mlflow.MlflowClient(), NAME)


def test_rollback_steps_back_through_the_audit_log(tiny_run, store, tmp_path):
    client = mlflow.MlflowClient()
    for i in range(3):
        new_version(tiny_run, tmp_path / str(i), "passed")
    with pytest.raises(registry.RegistryError, match=r"has no previous champion to roll back to \(aliases: "
                                                     r"challenger=3\)"):
        registry.rollback(client, NAME, "bad release")
    for v in (1, 2, 3):
        registry.promote(client, NAME, v, f"release {v}")
    assert registry.aliases(client, NAME) == {"champion": 3, "previous": 2}
    moves = registry.rollback(client, NAME, "latency regression in production")
    assert [(m["alias"], m["from"], m["to"]) for m in moves] == [("champion", 3, 2), ("rolled_back", None, 3),
                                                                 ("previous", 2, 1)]
    assert registry.aliases(client, NAME) == {"champion": 2, "previous": 1, "rolled_back": 3}
    registry.rollback(client, NAME, "still bad")
    assert registry.aliases(client, NAME) == {"champion": 1, "rolled_back": 2}  # nothing before 1
    registry.promote(client, NAME, 2, "fixed after all")  # no longer rolled back
    assert registry.aliases(client, NAME) == {"champion": 2, "previous": 1}
    registry.rollback(client, NAME, "no, it was not")
    before = registry.audit_log(client, NAME)
    with pytest.raises(registry.RegistryError, match="no previous champion"):
        registry.rollback(client, NAME, "again")
    assert registry.audit_log(client, NAME) == before
    # every move is also on the versions it involved
    tags = client.get_model_version(NAME, "3").tags
    assert [json.loads(v)["why"] for k, v in sorted(tags.items())
            if k.startswith("audit.") and json.loads(v)["action"] != "register"] == [
        "release 3", "promoted to champion: release 3", "latency regression in production",
        "rolled back: latency regression in production", "rolled back: still bad"]


def test_a_champion_that_never_went_live_rolls_back_to_the_live_version(tiny_run, store, tmp_path):
    client = mlflow.MlflowClient()
    for i in range(3):
        new_version(tiny_run, tmp_path / str(i), "passed")
        registry.promote(client, NAME, i + 1, f"release {i + 1}")
        if i == 0:
            registry.move(client, NAME, "deployed-local", 1, "live", "deploy")
    # 2 and 3 were promoted, but their deploys were refused: version 1 is what serves traffic
    moves = registry.rollback(client, NAME, "3 never went live", live="deployed-local")
    assert [(m["alias"], m["from"], m["to"]) for m in moves][:2] == [("champion", 3, 1), ("rolled_back", None, 3)]
    assert registry.aliases(client, NAME)["champion"] == 1
    # once the champion is live, a rollback goes to the previous champion as before
    registry.promote(client, NAME, 3, "release 3 again")
    registry.move(client, NAME, "deployed-local", 3, "live", "deploy")
    registry.rollback(client, NAME, "3 is bad after all", live="deployed-local")
    assert registry.aliases(client, NAME)["champion"] == 1


def test_unknown_version_and_missing_reason_change_nothing(tiny_run, store, tmp_path):
    client = mlflow.MlflowClient()
    new_version(tiny_run, tmp_path / "a", "passed")
    with pytest.raises(registry.RegistryError, match=r"triage-promote has no version 7 \(versions: 1\)"):
        registry.promote(client, NAME, 7, "why not")
    with pytest.raises(registry.RegistryError, match="needs a reason"):
        registry.promote(client, NAME, 1, "  ")
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.aliases(client, "nope")
    assert registry.aliases(client, NAME) == {"challenger": 1}
    assert [e["action"] for e in registry.audit_log(client, NAME)] == ["register"]
    assert registry.promote(client, NAME, 1, "first") and registry.promote(client, NAME, 1, "again") == []


def test_commands(tiny_run, store, tmp_path):
    new_version(tiny_run, tmp_path / "a", "passed")
    new_version(tiny_run, tmp_path / "b", "failed")
    env = {"MLFLOW_TRACKING_URI": store, "LLMOPS_ACTOR": "alice", "LLMOPS_SPEC": str(REPO / "pipelines.yaml"),
           "COLUMNS": "200"}

    def cli(*args):
        return run_cli([*args, "--model", NAME], cwd=tmp_path, **env)

    proc = cli("promote", "2", "--force")
    assert proc.returncode == 2 and "--force needs --reason" in proc.stderr
    proc = cli("promote", "1")
    assert proc.returncode == 2 and "--reason is required" in proc.stderr
    proc = cli("promote", "2", "--reason", "looks fine")
    assert proc.returncode == 1
    assert "triage-promote version 2: gates failed (exact_match); not promoted" in proc.stderr
    proc = cli("rollback", "--reason", "oops")
    assert proc.returncode == 1 and "has no previous champion" in proc.stderr
    assert registry.aliases(mlflow.MlflowClient(), NAME) == {"challenger": 2}  # nothing changed so far

    assert cli("promote", "1", "--reason", "first release").returncode == 0
    proc = cli("promote", "2", "--force", "--reason", "hotfix for the outage")
    assert proc.returncode == 0, proc.stderr
    assert "@champion: 1 -> 2  by alice" in proc.stdout
    assert "forced (gates failed): hotfix for the outage" in proc.stdout
    listing = cli("models", "list")
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 5}
    assert "champion" in rows["2"] and "failed (exact_match)" in rows["2"]
    assert "previous" in rows["1"] and "passed" in rows["1"]
    proc = cli("rollback", "--reason", "hotfix made it worse")
    assert proc.returncode == 0 and "@champion: 2 -> 1" in proc.stdout
    assert registry.aliases(mlflow.MlflowClient(), NAME) == {"champion": 1, "rolled_back": 2}
    audit = cli("models", "audit")
    assert audit.stdout.count("by alice") == 7 and "hotfix made it worse" in audit.stdout
    proc = cli("promote", "9", "--reason", "x")
    assert proc.returncode == 1 and "triage-promote has no version 9 (versions: 1, 2)" in proc.stderr
