"""The drift signals: a window of logged requests against the reference (the served
version's training prompts), each signal a number, its threshold and a verdict.

Most are Evidently 0.7 metrics in one Report (its HTML is the run's report): prompt length
(``ValueDrift``, Wasserstein distance in reference standard deviations), predicted labels
(``ValueDrift``, Jensen-Shannon distance per answer field), the unseen-word share, answer
validity, top-article similarity, error and rate-limited shares (``MeanValue``) and p95
latency (``QuantileValue``), each with its threshold as an Evidently test. Two are computed
beside the Report: embedding drift with Evidently's drift methods called directly (inside a
Report they also draw a t-SNE plot, which takes minutes), and the Jensen-Shannon distance of
word frequencies with the list of new frequent words. A signal judged on fewer requests than
its ``min_window`` says "not enough data", never "no drift".

A distance between samples is never zero: a window of 100 ordinary requests sits farther
from the reference than one of 1,000. So the distribution signals (prompt length, word
frequencies, labels, embeddings) drift only when their value passes the threshold *and*
what windows of the same size drawn from the reference itself reach (the ``chance``
quantile of a split bootstrap, see _chance, or Evidently's own bootstrap for the embedding classifier).
"""
from __future__ import annotations

import hashlib
import re
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import pandas as pd

from components.monitor.reference import Reference, request_text
from components.monitor.settings import Signals

WORD = re.compile(r"[^\W\d_]{2,}")
BELOW = {"answer_validity", "retrieval_similarity"}  # drift when the value falls under the threshold
STATISTIC = {
    "prompt_tokens": "Wasserstein distance of prompt tokens (reference std units)",
    "unseen_words": "share of words the reference never had",
    "frequent_words": "Jensen-Shannon distance of word frequencies",
    "embeddings": "embedding drift",
    "answer_labels": "Jensen-Shannon distance of predicted labels",
    "answer_validity": "share of valid answers",
    "retrieval_similarity": "median similarity of the top article",
    "error_rate": "share of 5xx answers",
    "p95_latency_ms": "p95 latency of answered requests (ms)",
    "rate_limited_share": "share of 429 answers",
}
CHANCE_DRAWS = 200  # bootstrap windows drawn from the reference for a chance level
TOP_WORDS = 1000  # the reference's most frequent words keep their own bucket; the rest share one


@dataclass
class SignalResult:
    name: str
    value: float | None
    threshold: float
    n: int  # requests it was judged on
    min_window: int
    status: str  # drift | ok | not enough data
    statistic: str
    detail: str = ""
    chance: float | None = None  # what a window of this size reaches without drift (quantile chance_quantile)

    @property
    def drifted(self) -> bool:
        return self.status == "drift"

    def dict(self) -> dict:
        return asdict(self)


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def window_frame(records: list[dict], count_tokens: Callable[[list[dict]], int], parse_answer) -> pd.DataFrame:
    """One row per logged request: what the signals read."""
    rows = []
    for r in records:
        status = int(r.get("status") or 0)
        row = {"status": status, "is_error": float(status >= 500), "rate_limited": float(status == 429),
               "latency_ms": float(r["latency_ms"]) if status == 200 and r.get("latency_ms") is not None else np.nan}
        messages = r.get("messages") or ([{"role": "user", "content": r["prompt"]}]  # /v1/completions: a text
                                         if isinstance(r.get("prompt"), str) else None)
        messages = messages if status == 200 else None
        if messages:
            row["text"] = request_text(messages)
            row["prompt_tokens"] = float(r["prompt_tokens"]) if r.get("prompt_tokens") else float(count_tokens(messages))
            if r.get("valid") is not None:
                row["valid"] = float(bool(r["valid"]))
            articles = r.get("articles") or []
            if articles and articles[0].get("score") is not None:
                row["top_score"] = float(articles[0]["score"])
            answer = parse_answer(r.get("answer")) if r.get("answer") else None
            for field, value in (answer or {}).items():
                row[f"label.{field}"] = str(value)
        rows.append(row)
    return pd.DataFrame(rows)


def reference_frame(ref: Reference, count_tokens: Callable[[list[dict]], int]) -> pd.DataFrame:
    rows = [{"prompt_tokens": float(count_tokens(m)), **{f"label.{k}": str(v) for k, v in labels.items()}}
            for m, labels in zip(ref.prompts, ref.labels)]
    return pd.DataFrame(rows)


def compute(cfg: Signals, current: pd.DataFrame, reference: pd.DataFrame, ref_texts: list[str],
            embed: Callable[[list[str], str], np.ndarray], seed: int = 0, timings: dict[str, float] | None = None):
    """(results, Evidently snapshot or None). ``embed(texts, side)`` returns L2-normalised
    embeddings (``side``: "reference" may be cached by the caller). ``timings`` gets the
    seconds each part took."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue, QuantileValue, ValueDrift
    from evidently.tests import gte, lte

    rng = np.random.default_rng(seed)
    timings = {} if timings is None else timings
    clock = [time.perf_counter()]

    def lap(part: str) -> None:
        now = time.perf_counter()
        timings[part] = timings.get(part, 0.0) + now - clock[0]
        clock[0] = now

    current, reference = current.copy(), reference.copy()
    ref_words = [words(t) for t in ref_texts]  # each text is split into words once
    vocab = Counter(w for ws in ref_words for w in ws)
    texts = [t for t in current.get("text", pd.Series(dtype=object)).tolist() if isinstance(t, str)]
    text_words = {t: words(t) for t in texts}
    if "text" in current:
        current["unseen_words"] = [_unseen_share(text_words[t], vocab) if isinstance(t, str) else np.nan
                                   for t in current["text"]]
    label_cols = sorted(c for c in reference.columns if c.startswith("label.") and c in current)
    numeric = ["prompt_tokens", "unseen_words", "valid", "top_score", "is_error", "rate_limited", "latency_ms"]
    for frame in (current, reference):
        for col in numeric + label_cols:
            if col not in frame:
                frame[col] = np.nan
    cur, ref = current[numeric + label_cols], reference[numeric + label_cols]
    lap("words")

    def test(name: str, spec):
        return [gte(spec.threshold)] if name in BELOW else [lte(spec.threshold)]

    def count(col: str) -> int:
        return int(cur[col].notna().sum())

    # (signal, column, metric) of the signals Evidently computes in the Report
    wanted = [("prompt_tokens", "prompt_tokens", lambda s: ValueDrift(column="prompt_tokens", method="wasserstein",
                                                                       threshold=s.threshold)),
              ("unseen_words", "unseen_words", lambda s: MeanValue(column="unseen_words", tests=test("unseen_words", s))),
              ("answer_validity", "valid", lambda s: MeanValue(column="valid", tests=test("answer_validity", s))),
              ("retrieval_similarity", "top_score",
               lambda s: QuantileValue(column="top_score", quantile=0.5, tests=test("retrieval_similarity", s))),
              ("error_rate", "is_error", lambda s: MeanValue(column="is_error", tests=test("error_rate", s))),
              ("p95_latency_ms", "latency_ms",
               lambda s: QuantileValue(column="latency_ms", quantile=0.95, tests=test("p95_latency_ms", s))),
              ("rate_limited_share", "rate_limited",
               lambda s: MeanValue(column="rate_limited", tests=test("rate_limited_share", s)))]
    if cfg.answer_labels.enabled:
        wanted += [("answer_labels", col, lambda s, col=col: ValueDrift(column=col, method="jensenshannon",
                                                                        threshold=s.threshold)) for col in label_cols]
    plan = []  # (signal, column, metric or None when below min_window, requests)
    for name, col, make in wanted:
        spec = getattr(cfg, name)
        if spec.enabled:
            plan.append((name, col, make(spec) if count(col) >= spec.min_window else None, count(col)))

    snapshot, values = None, {}
    metrics = [m for _, _, m, _ in plan if m is not None]
    if metrics:
        definition = DataDefinition(numerical_columns=numeric, categorical_columns=label_cols)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # statistics of the reference's empty columns
            snapshot = Report(metrics).run(current_data=Dataset.from_pandas(cur, data_definition=definition),
                                           reference_data=Dataset.from_pandas(ref, data_definition=definition))
        values = {m["id"]: m["value"] for m in snapshot.dict()["metrics"]}
    lap("evidently_report")

    def value_of(metric) -> float | None:
        raw = values.get(metric.get_metric_id()) if metric is not None else None
        return None if raw is None or not np.isfinite(raw) else float(raw)

    results: list[SignalResult] = []
    labels_seen = []
    q = cfg.chance_quantile
    for name, col, metric, n in plan:
        value, spec = value_of(metric), getattr(cfg, name)
        if name == "prompt_tokens" and value is not None:
            chance = _chance(ref[col].dropna().to_numpy(), n, wasserstein_norm, rng, q)
            results.append(_judge(name, value, spec, n, chance=chance))
        elif name == "answer_labels":
            chance = _chance(ref[col].dropna().to_numpy(), n, js_categorical, rng, q) if value is not None else None
            labels_seen.append((col[len("label."):], value, n, chance))
        else:
            results.append(_judge(name, value, spec, n))
    if labels_seen:  # one signal: the field that moved most beyond chance
        judged = [t for t in labels_seen if t[1] is not None]
        worst = max(judged, key=lambda t: t[1] - t[3]) if judged else None
        detail = ", ".join(f"{f} {v:.3f} (chance {c:.3f})" for f, v, _, c in judged)
        results.append(_judge("answer_labels", worst[1] if worst else None, cfg.answer_labels,
                              worst[2] if worst else max(t[2] for t in labels_seen), detail,
                              chance=worst[3] if worst else None))
    lap("chance_levels")
    if cfg.frequent_words.enabled:
        results.append(_frequent_words(cfg.frequent_words, [text_words[t] for t in texts], ref_words, vocab, rng, q))
        lap("frequent_words")
    if cfg.embeddings.enabled:
        results.append(_embeddings(cfg.embeddings, texts, ref_texts, embed, seed, q, lap))
    order = list(STATISTIC)
    results.sort(key=lambda r: order.index(r.name))
    return results, snapshot


def wasserstein_norm(ref: np.ndarray, cur: np.ndarray, cur_weights: np.ndarray | None = None) -> float:
    """Evidently's ``wasserstein`` drift value: Wasserstein distance in reference std units
    (``cur_weights``: how many times each value of ``cur`` occurs)."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(ref, cur, None, cur_weights) / max(float(np.std(ref)), 0.001))


def js_categorical(ref: np.ndarray, cur: np.ndarray, cur_weights: np.ndarray | None = None) -> float:
    """Evidently's ``jensenshannon`` drift value for a categorical column (natural log)
    (``cur_weights``: how many times each value of ``cur`` occurs)."""
    from scipy.spatial.distance import jensenshannon

    weights = [1.0] * len(cur) if cur_weights is None else np.asarray(cur_weights, dtype=float).tolist()
    r, c = Counter(ref.tolist()), Counter()
    for value, weight in zip(cur.tolist(), weights):
        c[value] += weight
    keys, total = sorted(set(r) | set(c)), sum(weights)
    return float(jensenshannon([r[k] / len(ref) for k in keys], [c[k] / total for k in keys]))


def _chance(ref: np.ndarray, n: int, statistic, rng, q: float, draws: int = CHANCE_DRAWS) -> float:
    """The ``q`` quantile of ``statistic`` when nothing drifted: one random half of the
    reference against windows of ``n`` drawn (with replacement) from the other half. A
    half is noisier than the whole reference and the other half holds values the first
    never saw, as real traffic does: the level errs on the side of fewer false alarms.
    A window is passed as the half's distinct values and how often each was drawn (the
    same statistic as the n values themselves, without handling n values 200 times)."""
    halves = np.array_split(rng.permutation(len(ref)), 2)
    base, pool = ref[halves[0]], ref[halves[1]]
    values, inverse = np.unique(pool, return_inverse=True)
    found = [statistic(base, values, np.bincount(inverse[rng.integers(0, len(pool), n)], minlength=len(values)))
             for _ in range(draws)]
    return float(np.quantile(found, q))


def _judge(name: str, value: float | None, spec, n: int, detail: str = "", chance: float | None = None) -> SignalResult:
    """The verdict: beyond the threshold (and, for distribution signals, beyond ``chance``)."""
    if n < spec.min_window or value is None:
        status = "not enough data"
    elif name in BELOW:
        status = "drift" if value < spec.threshold else "ok"
    else:
        status = "drift" if value > spec.threshold and (chance is None or value > chance) else "ok"
    return SignalResult(name, None if value is None else round(value, 6), spec.threshold, n, spec.min_window, status,
                        STATISTIC[name], detail, None if chance is None else round(chance, 6))


def _unseen_share(ws: list[str], vocab: Counter) -> float:
    return sum(w not in vocab for w in ws) / len(ws) if ws else np.nan


def _frequent_words(spec, texts: list[list[str]], ref_texts: list[list[str]], vocab: Counter, rng,
                    q: float) -> SignalResult:
    """``texts``, ``ref_texts``: each request's words."""
    if len(texts) < spec.min_window:
        return _judge("frequent_words", None, spec, len(texts))
    index = {w: i for i, (w, _) in enumerate(vocab.most_common(TOP_WORDS))}
    other = len(index)

    def counts(ws: list[str]) -> np.ndarray:
        row = np.zeros(other + 1, dtype=np.float32)
        for w in ws:
            row[index.get(w, other)] += 1
        return row

    ref_rows = np.stack([counts(ws) for ws in ref_texts])
    value = _js(ref_rows.sum(axis=0), np.stack([counts(ws) for ws in texts]).sum(axis=0))
    halves = np.array_split(rng.permutation(len(ref_rows)), 2)  # as in _chance: half against the other half
    base, pool = ref_rows[halves[0]].sum(axis=0), ref_rows[halves[1]]
    draws = [_js(base, np.bincount(rng.integers(0, len(pool), len(texts)), minlength=len(pool)) @ pool)
             for _ in range(CHANCE_DRAWS)]
    docs = Counter(w for ws in texts for w in set(ws) if w not in vocab)
    common = max(3, int(0.02 * len(texts)))  # in at least 2% of the window's requests
    new = [f"{w} ({c})" for w, c in docs.most_common(10) if c >= common]
    return _judge("frequent_words", value, spec, len(texts), f"new frequent words: {', '.join(new)}" if new else "",
                  chance=float(np.quantile(draws, q)))


def _js(reference_counts: np.ndarray, window_counts: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2) of two word-count vectors."""
    from scipy.spatial.distance import jensenshannon

    return float(jensenshannon(reference_counts / reference_counts.sum(),
                               window_counts / max(window_counts.sum(), 1), base=2))


def _embeddings(spec, texts: list[str], ref_texts: list[str], embed, seed: int, q: float, lap) -> SignalResult:
    """Evidently's drift method on the embeddings; with the classifier method, drift also
    needs an ROC AUC above what chance reaches on this many rows (Evidently's bootstrap)."""
    from evidently.metrics import embeddings as methods

    if len(texts) < spec.min_window:
        return _judge("embeddings", None, spec, len(texts))
    cur = embed(_sample(texts, spec.max_rows, seed), "window")
    ref = embed(_sample(ref_texts, spec.max_rows, seed + 1), "reference")
    lap("embed")
    cls = {"model": methods.ModelDriftMethod, "distance": methods.DistanceDriftMethod,
           "ratio": methods.RatioDriftMethod, "mmd": methods.MMDDriftMethod}[spec.method]
    columns = [f"e{i}" for i in range(cur.shape[1])]
    # the classifier's bootstrap run returns the same ROC AUC (the same seeded split and fit) and
    # whether it beats chance: one fit, not two
    bootstrap = {"bootstrap": True, "quantile_probability": q} if spec.method == "model" else {}
    score, significant, _ = cls(threshold=spec.threshold, pca_components=spec.pca_components, **bootstrap)(
        pd.DataFrame(cur, columns=columns), pd.DataFrame(ref, columns=columns))
    significant = significant if bootstrap else True
    lap("embedding_drift")
    result = _judge("embeddings", float(score), spec, len(texts), f"method {spec.method}, {len(cur)} vs {len(ref)} rows")
    if result.drifted and not significant:
        result.status, result.detail = "ok", result.detail + f"; within chance at this size (q{q:g})"
    return result


def _sample(texts: list[str], n: int, seed: int) -> list[str]:
    """``n`` of ``texts`` at random, keyed by a seeded hash of each text and its occurrence:
    a window that overlaps the last one picks mostly the same requests (whose embeddings
    are kept), and the copies of a repeated text are drawn independently of each other."""
    if len(texts) <= n:
        return list(texts)
    seen: Counter = Counter()
    keys = []
    for i, t in enumerate(texts):
        seen[t] += 1
        keys.append((hashlib.blake2b(f"{seed}\0{seen[t]}\0{t}".encode("utf-8"), digest_size=8).digest(), i))
    return [texts[i] for i in sorted(i for _, i in sorted(keys)[:n])]
