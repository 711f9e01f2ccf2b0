"""The deploy stage's decisions on numbers computed by hand: the smoke set's checks, shadow
agreement, canary margins, the latency budget it takes from the gates, and its spec section.
(The rollout itself, over HTTP: tests/serving/test_rollout.py; the stage end to end:
tests/flows/test_deploy_flow.py; the kserve and sagemaker targets: tests/deploy/.)"""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from components.deploy.local import judge_canary, judge_shadow, judge_smoke, p95
from components.deploy.rollout import latency_budget
from components.deploy.settings import CanarySpec, DeploySpec, ShadowSpec, SmokeSpec


def outcome(status=200, text="a", valid=True, latency_ms=100.0, model="m/1") -> dict:
    return {"status": status, "text": text, "valid": valid, "latency_ms": latency_ms, "model": model}


def by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_smoke_checks_validity_exact_match_against_the_registered_evaluation_and_latency():
    result = {"n": 10, "failed": 0, "json_valid_rate": 0.9, "exact_match": 0.7, "latency_p95_ms": 800.0,
              "failures": []}
    checks = by_name(judge_smoke(result, {"exact_match": 0.8}, SmokeSpec(exact_match_tolerance=0.15,
                                                                            min_valid_rate=0.9), 1000.0))
    assert all(c.passed for c in checks.values())
    assert checks["smoke exact match"].threshold == pytest.approx(0.65)  # 0.8 - 0.15
    worse = judge_smoke(result | {"exact_match": 0.6, "latency_p95_ms": 1200.0}, {"exact_match": 0.8},
                        SmokeSpec(exact_match_tolerance=0.15), 1000.0)
    failed = {c.name for c in worse if not c.passed}
    assert failed == {"smoke exact match", "smoke p95 latency ms"}
    line = by_name(worse)["smoke exact match"].line()
    assert line == "smoke exact match: 0.6 >= 0.65 -> FAILED (registered 0.8 - tolerance 0.15)"
    # a variant broken on this CPU: answers nothing valid
    broken = judge_smoke(result | {"json_valid_rate": 0.0, "exact_match": 0.0}, {"exact_match": 0.88}, SmokeSpec(),
                         None)
    assert {c.name for c in broken if not c.passed} == {"smoke answer validity", "smoke exact match"}
    assert "smoke p95 latency ms" not in by_name(broken)  # no budget: not checked
    # a request that failed fails the set, whatever the answers
    assert not by_name(judge_smoke(result | {"failed": 1, "failures": ["example 3: 500 boom"]}, {}, SmokeSpec(),
                                   None))["smoke failed requests"].passed


def test_shadow_agreement_validity_and_latency_ratio():
    pairs = [{"live": outcome(text="x", latency_ms=100), "candidate": outcome(text="x", latency_ms=120)}
             for _ in range(8)]
    pairs += [{"live": outcome(text="x", latency_ms=100), "candidate": outcome(text="y", valid=False, latency_ms=130)}
              for _ in range(2)]
    checks, numbers = judge_shadow(pairs, ShadowSpec(requests=10, min_agreement=0.8, max_invalid_increase=0.25,
                                                     max_p95_ratio=1.5))
    assert numbers["agreement"] == 0.8 and numbers["candidate"]["invalid_rate"] == 0.2
    assert numbers["live"]["latency_p95_ms"] == 100.0 and numbers["candidate"]["latency_p95_ms"] == 130.0
    assert all(c.passed for c in checks)
    assert by_name(checks)["shadow p95 latency ratio"].observed == 1.3
    strict = judge_shadow(pairs, ShadowSpec(requests=10, min_agreement=0.9, max_invalid_increase=0.1))[0]
    assert {c.name for c in strict if not c.passed} == {"shadow answer agreement", "shadow invalid increase"}
    too_few = judge_shadow(pairs[:4], ShadowSpec(requests=10))[0]
    assert not by_name(too_few)["shadow requests"].passed and by_name(too_few)["shadow requests"].observed == 4


def test_canary_rolls_back_on_errors_invalid_answers_or_latency_beyond_the_margins():
    live = [{"arm": "live"} | outcome(latency_ms=100.0 + i) for i in range(40)]
    good = [{"arm": "candidate"} | outcome(latency_ms=110.0 + i) for i in range(20)]
    checks, arms = judge_canary(live + good, CanarySpec(min_requests=20))
    assert all(c.passed for c in checks), [c.line() for c in checks]
    assert arms["candidate"]["requests"] == 20 and arms["live"]["requests"] == 40
    assert arms["live"]["latency_p95_ms"] == p95([100.0 + i for i in range(40)])
    erring = good[:18] + [{"arm": "candidate"} | outcome(status=500, text=None, valid=None)] * 2
    checks, arms = judge_canary(live + erring, CanarySpec(min_requests=20, max_error_rate_increase=0.05))
    assert arms["candidate"]["error_rate"] == 0.1
    assert {c.name for c in checks if not c.passed} == {"canary error rate increase"}
    slow = [{"arm": "candidate"} | outcome(latency_ms=400.0) for _ in range(20)]
    checks, _ = judge_canary(live + slow, CanarySpec(min_requests=20))
    assert {c.name for c in checks if not c.passed} == {"canary p95 latency ratio"}
    assert not by_name(judge_canary(live + good[:5], CanarySpec(min_requests=20))[0])["canary candidate requests"].passed


def test_the_latency_budget_comes_from_the_gates():
    from components.gates import GatesSpec

    gates = GatesSpec(checks={"latency": {"kind": "budget", "metric": "latency_p95_ms", "max": 1500},
                              "exact": {"kind": "absolute", "metric": "exact_match", "min": 0.5}})
    assert latency_budget(gates) == 1500
    assert latency_budget(GatesSpec(checks={"exact": {"kind": "absolute", "metric": "exact_match", "min": 0.5}})) \
        is None
    assert latency_budget(None) is None


@pytest.mark.parametrize("section, message", [
    ({"target": "k8s"}, "target"),
    ({"strategy": "blue-green"}, "strategy"),
    ({"canary": {"share": 1.0}}, "canary.share"),
    ({"sagemaker": {"role_arn_env": "arn:aws:iam::1:role/x"}}, "never its value"),
    ({"smoke": {"examples": 0}}, "smoke.examples"),
])
def test_a_bad_deploy_section_is_refused_naming_the_key(section, message):
    with pytest.raises(ValidationError) as err:
        DeploySpec(**section)
    assert message in str(err.value)
