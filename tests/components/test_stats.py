"""The shared statistics against values computed by hand (the arithmetic is in each test),
and the gate rule built on them: a vs_champion gate on a rate decides on per-chat pairs."""
from __future__ import annotations

import json
import math

import pytest

from components.base import StageError
from components.gates import pair_up
from components.gates.kinds import Evidence, VsChampionGate
from components.reports import ModelMetrics
from components.stats import Latency, interval_text, latency_text, mcnemar_p, min_count, paired, percentile_ms, wilson
from components.task import AnswerSchema, TaskSpec
from tests.components.conftest import ARTICLE_IDS

Z = 1.959963984540054  # the 97.5% normal quantile: a two-sided 95% interval


def test_wilson_by_hand():
    # 180 of 200: p = 0.9, z^2 = 3.8415
    # centre = (p + z^2 / 2n) / (1 + z^2 / n) = 0.909604 / 1.019207 = 0.892462
    # half = z * sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n) = 1.96 * 0.021772 / 1.019207 = 0.041868
    p, n = 0.9, 200
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / (1 + Z**2 / n)
    assert (round(centre, 6), round(half, 6)) == (0.892462, 0.041868)
    assert wilson(180, 200) == [0.8506, 0.9343] == [round(centre - half, 4), round(centre + half, 4)]
    # 0 of 10: the interval starts at 0 and ends at z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.2775
    # (a normal approximation would give [0, 0]: no uncertainty at all)
    assert wilson(0, 10) == [0.0, 0.2775]
    assert wilson(10, 10) == [0.7225, 1.0]
    # the interval narrows with n: 18 of 20 is as uncertain as +-13 points
    assert wilson(18, 20) == [0.699, 0.9721]
    assert wilson(0, 0) is None
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(11, 10)


def test_mcnemar_exact_by_hand():
    # b = 10 chats only the champion got right, c = 2 only the candidate: under "no difference"
    # each of the 12 discordant chats goes either way with probability 1/2, so
    # P(X >= 10) = (C(12,10) + C(12,11) + C(12,12)) / 2^12 = (66 + 12 + 1) / 4096 = 0.019287
    assert mcnemar_p(10, 2) == pytest.approx(79 / 4096) == pytest.approx(0.019287, abs=1e-6)
    # statsmodels' two-sided exact test is twice that
    from statsmodels.stats.contingency_tables import mcnemar

    assert mcnemar([[170, 10], [2, 18]], exact=True).pvalue == pytest.approx(2 * 79 / 4096)
    # b = 8, c = 2: P(X >= 8) = (45 + 10 + 1) / 1024 = 0.0547 (not below 0.05)
    assert mcnemar_p(8, 2) == pytest.approx(56 / 1024)
    # b = 4, c = 2: P(X >= 4) = (15 + 6 + 1) / 64 = 0.34375
    assert mcnemar_p(4, 2) == pytest.approx(22 / 64)
    assert mcnemar_p(0, 0) == 1.0  # no discordant chat: no evidence either way


def outcomes(both: int, b: int, c: int, neither: int) -> tuple[list[bool], list[bool]]:
    """(champion, candidate) per chat: ``both`` right, ``b`` only the champion, ``c`` only the
    candidate, ``neither``."""
    champion = [True] * both + [True] * b + [False] * c + [False] * neither
    candidate = [True] * both + [False] * b + [True] * c + [False] * neither
    return champion, candidate


def test_paired_difference_and_its_interval_by_hand():
    result = paired(*outcomes(160, 10, 2, 28))
    assert (result.n, result.b, result.c) == (200, 10, 2)
    assert (result.reference_rate, result.candidate_rate, result.difference) == (0.85, 0.81, -0.04)
    assert result.p_worse == pytest.approx(79 / 4096, abs=1e-6)
    assert result.p_better == pytest.approx(1 - (1 + 12) / 4096, abs=1e-6)  # P(X >= 2) = 1 - P(0) - P(1)
    # Agresti-Min: add 1/2 to each cell: b* = 10.5, c* = 2.5, n* = 202
    # difference* = (2.5 - 10.5) / 202 = -0.039604; se = sqrt(13 - 8^2 / 202) / 202 = 0.017630
    se = math.sqrt(13 - 64 / 202) / 202
    assert round(se, 6) == 0.01763
    assert result.difference_ci == [round(-8 / 202 - Z * se, 4), round(-8 / 202 + Z * se, 4)] == [-0.0742, -0.005]
    assert result.line() == ("paired on 200: b=10 (champion right only), c=2 (candidate right only), "
                             "difference -0.0400 [-0.0742, -0.0050]")
    with pytest.raises(ValueError, match="same non-zero length"):
        paired([True], [True, False])


def gate_on(gate: VsChampionGate, both: int, b: int, c: int, neither: int):
    pair = paired(*outcomes(both, b, c, neither))
    candidate = ModelMetrics(n=pair.n, json_valid_rate=1.0, exact_match=pair.candidate_rate, field_accuracy={})
    return gate.check("no_regression", Evidence(candidate=candidate, base=candidate, champion={"exact_match": 0.0},
                                                champion_note="champion v3", paired={"exact_match": pair}))


def test_a_one_point_drop_that_is_noise_passes():
    # 200 chats: champion 0.85, candidate 0.84 (b=4, c=2): past a margin of 0 but P(X >= 4 | 6) = 0.344
    row = gate_on(VsChampionGate(metric="exact_match", max_regression=0.0), 166, 4, 2, 28)
    assert row.passed and row.observed == 0.84 and row.threshold == 0.85 and row.margin == pytest.approx(-0.01)
    assert (row.paired.b, row.paired.c, row.paired.p_value, row.paired.significant) == (4, 2, 0.34375, False)
    assert row.note.endswith("drop not significant: p=0.3438 >= alpha 0.05")


def test_a_significant_drop_past_the_margin_fails():
    # 200 chats: champion 0.85, candidate 0.81 (b=10, c=2): 4 points > 2, and p = 0.0193 < 0.05
    row = gate_on(VsChampionGate(metric="exact_match", max_regression=0.02), 160, 10, 2, 28)
    assert not row.passed and row.margin == pytest.approx(-0.02)
    assert row.paired.p_value == pytest.approx(0.019287, abs=1e-6) and row.paired.difference_ci == [-0.0742, -0.005]
    assert row.note == ("champion v3 0.85 - 0.02; paired on 200: b=10 (champion right only), c=2 (candidate "
                        "right only), difference -0.0400 [-0.0742, -0.0050]; drop significant: p=0.01929 < alpha 0.05")


@pytest.mark.parametrize(("counts", "alpha", "passed"), [
    ((162, 8, 2, 28), 0.05, True),  # 3 points > 2, but p = 56/1024 = 0.0547: not significant
    ((162, 8, 2, 28), 0.06, False),  # the same at alpha 0.06
    ((1700, 30, 10, 260), 0.05, True),  # significant (p = 0.0011) but only 1 point of 2000: within the margin
])
def test_both_conditions_are_needed_to_fail(counts, alpha, passed):
    assert gate_on(VsChampionGate(metric="exact_match", max_regression=0.02, alpha=alpha), *counts).passed is passed


def test_min_gain_needs_a_significant_gain():
    gate = VsChampionGate(metric="exact_match", min_gain=0.01)
    assert gate_on(gate, 160, 2, 10, 28).passed  # +4 points, P(X >= 10 | 12) = 0.0193
    row = gate_on(gate, 160, 2, 4, 34)  # +1 point (at the margin) but P(X >= 4 | 6) = 0.344
    assert not row.passed and row.margin == pytest.approx(0.0) and "gain not significant" in row.note


def test_a_rate_without_pairs_is_an_error_and_perplexity_compares_values():
    metrics = ModelMetrics(n=10, json_valid_rate=1.0, exact_match=0.8, field_accuracy={}, perplexity=1.1)
    evidence = Evidence(candidate=metrics, base=metrics, champion={"exact_match": 0.8, "perplexity": 1.0},
                        champion_note="champion v1")
    with pytest.raises(StageError, match="gate 'g': exact_match against the champion needs both models' answers"):
        VsChampionGate(metric="exact_match", max_regression=0.02).check("g", evidence)
    row = VsChampionGate(metric="perplexity", max_regression=0.05).check("g", evidence)
    assert not row.passed and row.paired is None and row.margin == pytest.approx(-0.05)


def test_pairs_come_from_answers_to_the_same_chats():
    schema = AnswerSchema.of(TaskSpec(), {"article_id": ARTICLE_IDS})
    gold = {"intent": "billing_refund", "priority": "high", "article_id": "KB-101"}
    examples = [{"ticket_id": f"T{i}", "labels": gold} for i in range(4)]
    right, wrong_priority = json.dumps(gold), json.dumps({**gold, "priority": "low"})
    champion = {"T0": right, "T1": right, "T2": "not json", "T3": right}
    candidate = {"T0": right, "T1": wrong_priority, "T2": right, "T9": right}  # T3 unanswered, T9 not a test chat
    pairs = pair_up(schema, examples, champion, candidate, {"exact_match", "json_valid_rate", "intent_accuracy"})
    assert (pairs["exact_match"].n, pairs["exact_match"].b, pairs["exact_match"].c) == (3, 1, 1)  # T0..T2
    assert (pairs["json_valid_rate"].b, pairs["json_valid_rate"].c) == (0, 1)
    assert (pairs["intent_accuracy"].b, pairs["intent_accuracy"].c) == (0, 1)
    with pytest.raises(StageError, match="'perplexity' is not a rate of this task's answers"):
        pair_up(schema, examples, champion, candidate, {"perplexity"})


def test_a_percentile_is_claimed_only_from_enough_requests():
    # at least one request expected above it: ceil(1 / (1 - q/100))
    assert (min_count(50), min_count(95), min_count(99)) == (2, 20, 100)
    seconds = [1.0 + i / 10 for i in range(8)]  # 1.0 .. 1.7 s
    timed = Latency.of(seconds)
    assert (timed.requests, timed.p50_ms, timed.p95_ms, timed.max_ms) == (8, 1350.0, None, 1700.0)
    assert timed.p95_or_max() == (1700.0, "max of 8 requests (p95 needs >= 20)")
    assert latency_text(timed) == "p50 1350 ms, max 1700 ms (8 requests; p95 needs >= 20)"
    # 20 requests, 1.0 .. 2.9 s: the p95 interpolates between the 19th and 20th (rank 18.05 of 0..19)
    twenty = Latency.of([1.0 + i / 10 for i in range(20)])
    assert twenty.p95_ms == pytest.approx(1000 * (2.8 + 0.05 * 0.1)) and twenty.max_ms == 2900.0
    assert twenty.p95_or_max() == (2805.0, "p95 of 20 requests") and twenty.shown_p95() == "2805"
    assert Latency.of([2.0]).p50_ms is None and Latency.of([2.0]).p50_or_max() == 2000.0
    assert percentile_ms([], 50) is None and latency_text(Latency.of([])) == "not measured"
    assert interval_text([0.8506, 0.9343]) == "[0.851, 0.934]" and interval_text(None) == ""
