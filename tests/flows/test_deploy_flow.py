"""The deploy stage as a user meets it: the shared pipeline run ends with the champion live
on an endpoint the stage started; in a copy of that project, under steady client load, a
candidate that fails its smoke set is refused, a good one goes live with no failed request,
a canary worse than its margins is rolled back, a shadow that agrees goes live, and
`llmops rollback` moves the registry and the endpoint back together."""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.conftest import ENFORCE, ENV, TRAINING, Load, copy_project, run_cli

pytestmark = pytest.mark.integration
NAME = "support-triage"
CHAT = {"model": NAME, "messages": [], "max_tokens": 4, "temperature": 0}


def endpoint_url(project) -> str:
    from llmops.spec import load_spec

    port = load_spec(project / "pipelines.yaml", env={}).pipeline(None)[1].serve.port
    return f"http://127.0.0.1:{port}"


def live_model(url: str) -> str:
    return httpx.get(f"{url}/admin/status", timeout=30).json()["live"]["model"]


def test_the_run_ends_with_the_champion_live_on_an_endpoint_it_started(pipeline_run):
    from components.reports import DeployReport, PromotionReport

    assert pipeline_run.returncode == 0, pipeline_run.stdout + pipeline_run.stderr
    out = pipeline_run.project / "artifacts" / NAME
    promoted, deployed = PromotionReport.read(out / "promote"), DeployReport.read(out / "deploy")
    url = endpoint_url(pipeline_run.project)
    assert (deployed.outcome, deployed.target, deployed.strategy, deployed.url) == ("deployed", "local", "direct", url)
    assert deployed.version == promoted.version and deployed.started_endpoint
    assert {c.name for c in deployed.checks} >= {"smoke failed requests", "smoke answer validity",
                                                  "smoke exact match", "smoke p95 latency ms"}
    assert all(c.passed for c in deployed.checks) and deployed.numbers["smoke"]["n"] == 4
    assert f"deploy: {NAME} version {deployed.version} deployed on local at {url} (direct; smoke set: 4 chats" \
        in pipeline_run.stdout
    assert live_model(url) == f"{NAME}/{deployed.version}"
    answered = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"messages": [{"role": "user", "content": "hi"}]},
                          timeout=120)
    assert answered.status_code == 200 and answered.headers["x-llmops-model"] == f"{NAME}/{deployed.version}"
    status = run_cli(["deploy", "status"], cwd=pipeline_run.project)
    assert status.returncode == 0, status.stderr
    assert f"local: version {deployed.version} live since" in status.stdout
    assert f"endpoint {url}: serving {NAME}/{deployed.version}" in status.stdout and "started by deploy" in status.stdout
    assert f"version {deployed.version} -> local (direct): deployed" in status.stdout


def test_rollouts_under_load_refuse_roll_back_and_switch_without_a_failed_request(pipeline_run, tmp_path):
    project = copy_project(pipeline_run, tmp_path / "project", {"stages": TRAINING + ["deploy"]})
    url = endpoint_url(project)
    try:
        first = run_cli(["stage", "deploy", *ENFORCE], cwd=project, **ENV)
        assert first.returncode == 0, first.stdout + first.stderr
        assert live_model(url) == f"{NAME}/1"
        registered = run_cli(["stage", "register", *ENFORCE], cwd=project, **ENV)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        promoted = run_cli(["promote", "2", "--reason", "the rollout test's candidate"], cwd=project, **ENV)
        assert promoted.returncode == 0, promoted.stdout + promoted.stderr

        with Load(url, CHAT, clients=3) as load:
            load.wait_for(6, timeout_s=120)
            # a candidate that answers no valid JSON (this small model) fails a smoke set that asks for it
            refused = run_cli(["stage", "deploy", *ENFORCE, "--set", "deploy.smoke.min_valid_rate=0.5"], cwd=project,
                              **ENV)
            load.wait_for(3, timeout_s=120)
            # a canary slower than a (deliberately tight) latency margin answers its share, then is rolled back
            canary = run_cli(["stage", "deploy", *ENFORCE, "--set", "deploy.strategy=canary", "--set",
                              "deploy.canary.share=0.5", "--set", "deploy.canary.min_requests=6", "--set",
                              "deploy.canary.max_p95_ratio=0.01"], cwd=project, **ENV)
            rolled_back = time.perf_counter()
            load.wait_for(6, timeout_s=120)
        assert refused.returncode == 1
        assert "smoke answer validity: 0 >= 0.5 -> FAILED" in refused.stderr and "version 1 stays live" in \
            refused.stderr, refused.stderr
        assert canary.returncode == 1 and f"{NAME} version 2 rolled back (local, canary)" in canary.stderr, \
            canary.stdout + canary.stderr
        assert "canary p95 latency ratio" in canary.stderr and "FAILED" in canary.stderr
        assert [r for r in load.results if r[3] != 200] == [], "requests failed during the refusal and the canary"
        assert sum(r[4] == f"{NAME}/2" for r in load.results) >= 6  # the canary's share
        assert {r[4] for r in load.results if r[1] > rolled_back} == {f"{NAME}/1"}
        assert live_model(url) == f"{NAME}/1"

        with Load(url, CHAT, clients=3) as load:
            load.wait_for(6, timeout_s=120)
            # a shadow answering like the live version (the same weights), then live
            shadow = run_cli(["stage", "deploy", *ENFORCE, "--set", "deploy.strategy=shadow", "--set",
                              "deploy.shadow.requests=6"], cwd=project, **ENV)
            load.wait_for(6, timeout_s=120)
        assert shadow.returncode == 0, shadow.stdout + shadow.stderr
        assert re.search(r"shadow answer agreement: [0-9.]+ >= 0.8 -> ok", shadow.stdout), shadow.stdout
        assert [r for r in load.results if r[3] != 200] == [], "requests failed during the shadow and the switch"
        for models in load.per_client():
            assert sum(a != b for a, b in zip(models, models[1:])) == 1, models  # 1 ... 1, 2 ... 2
            assert models[0] == f"{NAME}/1" and models[-1] == f"{NAME}/2"
        assert live_model(url) == f"{NAME}/2"

        attempts = [json.loads(line) for line in
                    (project / ".llmops" / "deploy" / f"{NAME}.jsonl").read_text().splitlines()]
        assert [(a["version"], a["strategy"], a["outcome"]) for a in attempts[-4:]] == [
            (1, "direct", "deployed"), (2, "direct", "refused"), (2, "canary", "rolled back"),
            (2, "shadow", "deployed")]
        audit = run_cli(["models", "audit"], cwd=project)
        assert "deployed-local" in audit.stdout and "version 2 rolled back (canary)" in audit.stdout, audit.stdout

        # the registry and the endpoint go back together
        back = run_cli(["rollback", "--reason", "the rollout test rolls back"], cwd=project, **ENV)
        assert back.returncode == 0, back.stdout + back.stderr
        assert f"deploy: version 1 deployed at {url}" in back.stdout
        assert live_model(url) == f"{NAME}/1"
        status = run_cli(["deploy", "status"], cwd=project)
        assert "champion 1" in status.stdout and "local: version 1 live since" in status.stdout
    finally:
        run_cli(["serve", "stop"], cwd=project)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=5)
