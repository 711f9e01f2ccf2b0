"""The statistics every judgement of a model uses (evaluate, compress, gates), in one place.

- :func:`wilson`: the 95% (``level``) Wilson score interval of a proportion k of n, e.g.
  exact match 180 of 200 -> [0.851, 0.934]. It stays inside [0, 1] and is honest at
  small n and at rates near 0 or 1, where the normal approximation is not.
- :func:`paired`: two models on the same chats. McNemar's exact test looks only at the
  discordant chats (b: the reference right and the candidate wrong, c: the other way);
  under "no difference" each discordant chat goes either way with probability 1/2, so
  the one-sided p-value of a drop is P(X >= b) for X ~ Binomial(b + c, 1/2). The
  difference (candidate - reference = (c - b) / n) comes with an Agresti-Min interval.
- :func:`latency`: percentiles of request latencies that say how many requests they come
  from, and claim a percentile only when the count supports it (:func:`min_count`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # confidence level of every interval reported


def wilson(k: int, n: int, level: float = LEVEL) -> list[float] | None:
    """[lo, hi] of the Wilson score interval for ``k`` successes in ``n`` (rounded to 4
    places); None when ``n`` is 0. Raises ValueError when k is not within 0..n."""
    from statsmodels.stats.proportion import proportion_confint

    if not 0 <= k <= n:
        raise ValueError(f"a proportion needs 0 <= k <= n (got k={k}, n={n})")
    if n == 0:
        return None
    lo, hi = proportion_confint(k, n, alpha=1 - level, method="wilson")
    return [round(float(lo), 4), round(float(hi), 4)]


def interval_text(ci: list[float] | None) -> str:
    """``[0.851, 0.934]`` for tables; ``""`` when there is no interval."""
    return "" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


@dataclass(frozen=True)
class Paired:
    """Two models' per-chat outcomes on the same ``n`` chats."""

    n: int
    b: int  # reference right, candidate wrong (the candidate's losses)
    c: int  # candidate right, reference wrong (its wins)
    reference_rate: float
    candidate_rate: float
    p_worse: float  # one-sided exact McNemar: P(X >= b), X ~ Binomial(b + c, 1/2)
    p_better: float  # the other side: P(X >= c)
    difference: float  # candidate - reference = (c - b) / n
    difference_ci: list[float]  # Agresti-Min interval of the difference at ``level``

    def line(self) -> str:
        lo, hi = self.difference_ci
        return (f"paired on {self.n}: b={self.b} (champion right only), c={self.c} (candidate right only), "
                f"difference {self.difference:+.4f} [{lo:+.4f}, {hi:+.4f}]")


def mcnemar_p(losses: int, wins: int) -> float:
    """One-sided exact McNemar p-value that the candidate is worse: P(X >= losses) for X ~
    Binomial(losses + wins, 1/2); 1.0 when no chat is discordant (no evidence either way)."""
    from scipy.stats import binomtest

    if losses + wins == 0:
        return 1.0
    return float(binomtest(losses, losses + wins, 0.5, alternative="greater").pvalue)


def paired(reference: list[bool], candidate: list[bool], level: float = LEVEL) -> Paired:
    """McNemar's exact test and the difference's interval for per-chat outcomes of two
    models on the same chats (same order). Raises ValueError on lists of other lengths or
    empty ones."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"paired outcomes need two lists of the same non-zero length "
                         f"(got {len(reference)} and {len(candidate)})")
    n = len(reference)
    b = sum(r and not c for r, c in zip(reference, candidate))
    c = sum(c and not r for r, c in zip(reference, candidate))
    # Agresti & Min (2005): add 1/2 to each of the four cells, then a Wald interval.
    z = _z(level)
    bb, cc, nn = b + 0.5, c + 0.5, n + 2
    diff = (cc - bb) / nn
    se = math.sqrt(max(bb + cc - (cc - bb) ** 2 / nn, 0.0)) / nn
    ci = [round(max(-1.0, diff - z * se), 4), round(min(1.0, diff + z * se), 4)]
    return Paired(n=n, b=b, c=c, reference_rate=round(sum(reference) / n, 4),
                  candidate_rate=round(sum(candidate) / n, 4), p_worse=round(mcnemar_p(b, c), 6),
                  p_better=round(mcnemar_p(c, b), 6), difference=round((c - b) / n, 4), difference_ci=ci)


def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - (1 - level) / 2))


def min_count(q: float) -> int:
    """Requests needed before the ``q``-th percentile is claimed: ceil(1 / (1 - q/100)), so
    that at least one request is expected above it (p50: 2, p95: 20, p99: 100)."""
    return math.ceil(1 / (1 - q / 100) - 1e-9)


def percentile_ms(seconds: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``seconds`` in ms (1 decimal); None when there are fewer
    than :func:`min_count` values."""
    if len(seconds) < max(min_count(q), 1):
        return None
    return round(1000 * float(np.percentile(seconds, q)), 1)


@dataclass(frozen=True)
class Latency:
    """Request latencies one at a time: p50/p95 only where ``requests`` supports them."""

    requests: int
    p50_ms: float | None
    p95_ms: float | None
    max_ms: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> "Latency":
        return cls(requests=len(seconds), p50_ms=percentile_ms(seconds, 50), p95_ms=percentile_ms(seconds, 95),
                   max_ms=round(1000 * max(seconds), 1) if seconds else None)

    def p95_or_max(self) -> tuple[float | None, str]:
        """The p95 when claimed, else the slowest request (an upper bound of the sample's
        p95), with what it is: ``"p95 of 20 requests"`` or ``"max of 2 requests"``."""
        if self.p95_ms is not None:
            return self.p95_ms, f"p95 of {self.requests} requests"
        return self.max_ms, f"max of {self.requests} requests (p95 needs >= {min_count(95)})"

    def shown_p95(self) -> str:
        """For tables: ``"1873.2"`` (a p95), ``"max 2301.0 of 8"`` or ``""`` (not timed)."""
        if self.p95_ms is not None:
            return f"{self.p95_ms:g}"
        return "" if self.max_ms is None else f"max {self.max_ms:g} of {self.requests}"

    def p50_or_max(self) -> float | None:
        return self.p50_ms if self.p50_ms is not None else self.max_ms


def latency_text(timed: Latency) -> str:
    """``p50 1542 ms, p95 1873 ms (20 requests)``, or what the count allows: ``p50 1542 ms,
    max 2301 ms (8 requests; p95 needs >= 20)``; ``not measured`` for none."""
    if not timed.requests:
        return "not measured"
    parts = [f"p50 {timed.p50_ms:g} ms"] if timed.p50_ms is not None else []
    if timed.p95_ms is not None:
        return ", ".join(parts + [f"p95 {timed.p95_ms:g} ms"]) + f" ({timed.requests} requests)"
    return ", ".join(parts + [f"max {timed.max_ms:g} ms"]) + f" ({timed.requests} requests; p95 needs >= {min_count(95)})"
