"""Gated promotion as a user meets it: `llmops run` twice on the real base model with a real
MLflow registry, then `llmops promote` and `llmops rollback`."""
from __future__ import annotations

import json
import sqlite3

import mlflow
import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration

# Gates a 2-step fine-tune can pass and the same model trained for 1 step cannot: the gold
# answers' perplexity must not get worse than the champion's (and the usual budgets).
GATES = ("gates.checks={perplexity: {kind: vs_champion, metric: perplexity, max_regression: 0.0}, "
         "exact_match: {kind: vs_champion, metric: exact_match, max_regression: 0.02}, "
         "latency: {kind: budget, metric: latency_p95_ms, max: 120000}}")
ENFORCE = ["--set", "promote.mode=enforce", "--set", GATES]


def test_gates_decide_promotion_and_rollback_restores(project):
    env = {"LLMOPS_ACTOR": "release-bot", "COLUMNS": "200"}
    first = run_cli(["run", *ENFORCE], cwd=project, **env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "gates: passed (compared with no champion)" in first.stdout
    assert "register: support-triage version 1 -> @challenger, gates passed" in first.stdout
    assert "promote: version 1 promoted (@champion - -> 1; @challenger 1 -> -)" in first.stdout

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / '.llmops' / 'mlflow' / 'mlflow.db'}")

    def aliases():
        return {a: int(v) for a, v in client.get_registered_model("support-triage").aliases.items()}

    assert aliases() == {"champion": 1}
    champion_ppl = float(client.get_model_version("support-triage", "1").tags["metric.perplexity"])

    # A deliberately weak configuration: one training step. Its gates fail, the run exits 1
    # naming them, the version stays challenger and the champion is untouched.
    second = run_cli(["run", "--from", "finetune", *ENFORCE, "--set", "finetune.max_steps=1"], cwd=project, **env)
    assert second.returncode == 1, second.stdout + second.stderr
    weak_ppl = float(client.get_model_version("support-triage", "2").tags["metric.perplexity"])
    assert weak_ppl > champion_ppl
    assert (f"gates failed: perplexity (perplexity {weak_ppl:g} <= {champion_ppl:g}, "
            f"margin {round(champion_ppl - weak_ppl, 6):g}). support-triage version 2 stays challenger; "
            "champion v1 unchanged") in second.stderr
    assert "Traceback" not in second.stderr
    assert "gates: failed (compared with champion v1)" in second.stdout  # the table, before the error
    assert aliases() == {"champion": 1, "challenger": 2}
    v2 = client.get_model_version("support-triage", "2")
    assert (v2.tags["gates.status"], v2.tags["gates.failed"], v2.tags["promotion"]) == ("failed", "perplexity",
                                                                                        "refused")
    out = project / "artifacts" / "support-triage"
    report = json.loads((out / "gates" / "report.json").read_text())
    assert report["failed"] == ["perplexity"] and report["champion"] == "champion v1"
    assert json.loads((out / "gates" / "metrics.json").read_text())["gates"]["perplexity"]["passed"] is False
    assert json.loads((out / "promote.failed" / "promotion.json").read_text())["outcome"] == "refused"
    with sqlite3.connect(project / ".llmops" / "prefect" / "prefect.db") as con:
        states = dict(con.execute("select name, state_type from task_run where name in ('gates', 'promote') "
                                  "order by created").fetchall())
        artifacts = {k for (k,) in con.execute("select key from artifact where type = 'markdown'")}
    assert states == {"gates": "COMPLETED", "promote": "FAILED"}
    assert "support-triage-gates" in artifacts
    gates_run = client.search_runs([client.get_experiment_by_name("support-triage").experiment_id],
                                   "attributes.run_name = 'gates'", order_by=["attributes.start_time DESC"])[0]
    assert gates_run.data.tags["gates.status"] == "failed" and gates_run.data.tags["gate.perplexity"] == "failed"
    assert "gates/report.json" in [f.path for f in client.list_artifacts(gates_run.info.run_id, "gates")]

    # Forcing the weak version in needs a reason; with one it goes in, and rollback undoes it.
    forced = run_cli(["promote", "2", "--force"], cwd=project, **env)
    assert forced.returncode == 2 and "--force needs --reason" in forced.stderr
    assert aliases() == {"champion": 1, "challenger": 2}
    forced = run_cli(["promote", "2", "--force", "--reason", "trying the 1-step model"], cwd=project, **env)
    assert forced.returncode == 0, forced.stderr
    assert aliases() == {"champion": 2, "previous": 1}
    back = run_cli(["rollback", "--reason", "perplexity regression"], cwd=project, **env)
    assert back.returncode == 0, back.stderr
    assert "@champion: 2 -> 1  by release-bot" in back.stdout
    assert aliases() == {"champion": 1, "rolled_back": 2}
    listing = run_cli(["models", "list"], cwd=project, **env)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 5}
    assert "champion" in rows["1"] and "passed" in rows["1"]
    assert "rolled_back" in rows["2"] and "failed (perplexity)" in rows["2"]
