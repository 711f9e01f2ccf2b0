"""Near-duplicate leakage: evaluation tickets whose near-copy is in the training split.

The exact leakage check only catches the same normalised text in two splits. Tickets
written from one template with other slot values (a name, an invoice number, a count, a
product) are different strings yet teach the model the test answer. Here every validation
and test ticket gets its most similar training ticket by the Jaccard similarity of the
shingle sets of their masked texts: e-mail addresses, ids such as ``INV-48213``, numbers
and the customer's own name (from the customers table) are replaced by placeholders first,
so two tickets that differ only in those score 1.0.

The Jaccard similarities come from sparse matrix products of binary shingle vectors
(scikit-learn's ``HashingVectorizer``: stateless, memory bounded by the number of
shingles), taken a chunk of evaluation rows at a time so that memory stays bounded by
``CELLS`` similarity cells, whatever the number of tickets.
"""
from __future__ import annotations

import re
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from components.base import StrictModel
from components.reports import NearDuplicatePair, NearDuplicateReport

CELLS = 1 << 23  # evaluation rows x training rows compared per sparse product (~100 MB at worst)
EVALUATED = ("validation", "test")
SHOWN = "subject+body (near-duplicate)"  # the column as reports name it

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_ID = re.compile(r"\b[A-Za-z]+-?\d[\w-]*\b")  # INV-48213, E512, TCK-000123
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")


class Shingle(StrictModel):
    unit: Literal["words", "chars"] = "words"  # words: word n-grams; chars: character n-grams
    n: int = Field(3, ge=1, le=12)  # the n of the n-grams


class NearDuplicates(StrictModel):
    enabled: bool = True  # false: only exact copies are looked for
    similarity: float = Field(0.35, gt=0, le=1)  # Jaccard of the shingle sets; at or above: near copy
    shingle: Shingle = Shingle()
    max_share: float = Field(0.05, ge=0, le=1)  # of validation + test rows allowed a near copy in train
    action: Literal["warn", "error", "quarantine"] = "warn"  # when more than max_share have one

    @property
    def severity(self) -> str:
        """The severity the expectation carries: only ``error`` stops the run."""
        return "error" if self.action == "error" else "warn"


def mask(texts: pd.Series, names: pd.Series | None = None) -> pd.Series:
    """Slot values replaced by placeholders: e-mail addresses, ids, numbers and, where
    ``names`` (aligned with ``texts``) gives one, the writer's name."""
    out = texts.fillna("").astype(str)
    if names is not None:
        out = pd.Series([t.replace(n, " NAME ") if isinstance(n, str) and n else t
                         for t, n in zip(out, names)], index=out.index)
    out = out.str.replace(_EMAIL, " EMAIL ", regex=True)
    out = out.str.replace(_ID, " ID ", regex=True)
    return out.str.replace(_NUMBER, " NUM ", regex=True).str.lower()


def shingles(texts: pd.Series, shingle: Shingle):
    """Binary shingle vectors (CSR, one row per text, int32 ones)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    kw = (dict(analyzer="word", token_pattern=r"(?u)\b\w+\b") if shingle.unit == "words"
          else dict(analyzer="char", preprocessor=lambda t: re.sub(r"\s+", " ", t)))
    vec = HashingVectorizer(ngram_range=(shingle.n, shingle.n), n_features=1 << 24, binary=True, norm=None,
                            alternate_sign=False, lowercase=True, dtype=np.float32, **kw)
    x = vec.transform(texts.tolist()).tocsr()
    x.data = np.ones_like(x.data, dtype=np.int32)
    return x.astype(np.int32)


def nearest(queries, corpus) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries``, the row of ``corpus`` with the highest Jaccard
    similarity (the lowest row on ties) and that similarity (0.0 and -1 when none shares a shingle)."""
    n_q, n_c = queries.shape[0], corpus.shape[0]
    best = np.full(n_q, -1, dtype=np.int64)
    score = np.zeros(n_q, dtype=np.float64)
    if n_q == 0 or n_c == 0:
        return best, score
    q_size = np.diff(queries.indptr).astype(np.float64)
    c_size = np.diff(corpus.indptr).astype(np.float64)
    corpus_t = corpus.T.tocsr()
    step = max(1, CELLS // n_c)
    for start in range(0, n_q, step):
        inter = (queries[start:start + step] @ corpus_t).tocsr()  # shared shingles per pair
        counts = np.diff(inter.indptr)
        rows = np.repeat(np.arange(len(counts)), counts)
        jac = inter.data / (q_size[start + rows] + c_size[inter.indices] - inter.data)
        hit = np.flatnonzero(counts)  # rows sharing a shingle with some corpus row
        if not len(hit):
            continue
        top = np.maximum.reduceat(jac, inter.indptr[hit])
        # the lowest corpus row among those at the top, so ties do not depend on storage order
        at_top = jac == np.repeat(top, counts[hit])
        first = np.minimum.reduceat(np.where(at_top, inter.indices, n_c), inter.indptr[hit])
        best[start + hit], score[start + hit] = first, top
    return best, score


def add_columns(df: pd.DataFrame, text: pd.Series, cfg: NearDuplicates, customers: pd.DataFrame | None) -> None:
    """Add ``_near_duplicate`` (evaluation rows only; None on training rows), ``_near_train_id``
    and ``_near_similarity`` to ``df``, which carries ``_split`` and ``ticket_id``."""
    names = None
    if customers is not None and {"customer_id", "name"} <= set(customers.columns) and "customer_id" in df:
        lookup = dict(zip(customers["customer_id"].astype(str), customers["name"]))
        names = df["customer_id"].astype(str).map(lookup)
    x = shingles(mask(text, names), cfg.shingle)
    is_train = (df["_split"] == "train").to_numpy()
    is_eval = df["_split"].isin(EVALUATED).to_numpy()
    train_pos, eval_pos = np.flatnonzero(is_train), np.flatnonzero(is_eval)
    best, score = nearest(x[eval_pos], x[train_pos])
    train_ids = df["ticket_id"].astype(str).to_numpy()[train_pos]
    flag = pd.Series([None] * len(df), index=df.index, dtype=object)
    near_id = pd.Series([None] * len(df), index=df.index, dtype=object)
    sim = pd.Series(np.nan, index=df.index)
    flag.iloc[eval_pos] = [bool(s >= cfg.similarity) for s in score]
    near_id.iloc[eval_pos] = [train_ids[b] if b >= 0 else None for b in best]
    sim.iloc[eval_pos] = np.round(score, 4)
    df["_near_duplicate"], df["_near_train_id"], df["_near_similarity"] = flag, near_id, sim


def evaluated(checked: pd.DataFrame) -> pd.DataFrame:
    """The rows the near-duplicate expectation looks at: validation and test tickets."""
    return checked[checked["_split"].isin(EVALUATED)]


def reason(row, cfg: NearDuplicates) -> str:
    return (f"leakage: near-duplicate of training ticket {row['_near_train_id']} "
            f"(similarity {row['_near_similarity']:.2f} >= {cfg.similarity:g})")


def quarantine_rows(checked: pd.DataFrame, cfg: NearDuplicates, failed: bool, row_col: str) -> dict[int, str]:
    """Row -> reason for the evaluation rows to set aside: those with a near copy, when the
    action is quarantine and the check failed (more than max_share of them)."""
    if not (cfg.enabled and cfg.action == "quarantine" and failed and "_near_duplicate" in checked):
        return {}
    flagged = checked[checked["_near_duplicate"].eq(True)]
    return {int(r[row_col]): reason(r, cfg) for _, r in flagged.iterrows()}


def _short(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def summarise(checked: pd.DataFrame, text: pd.Series, cfg: NearDuplicates, failed: bool,
              quarantined: int, n_examples: int = 3) -> NearDuplicateReport:
    """Counts, share and a few example pairs, spread over the flagged similarities."""
    ev = evaluated(checked)
    flagged = ev[ev["_near_duplicate"].eq(True)].sort_values(["_near_similarity", "ticket_id"],
                                                              ascending=[False, True])
    by_id = dict(zip(checked["ticket_id"].astype(str), text))
    picks = sorted(set(np.linspace(0, len(flagged) - 1, n_examples).round().astype(int))) if len(flagged) else []
    examples = [NearDuplicatePair(
        ticket_id=str(r["ticket_id"]), split=r["_split"], train_ticket_id=r["_near_train_id"],
        similarity=float(r["_near_similarity"]), text=_short(by_id[str(r["ticket_id"])]),
        train_text=_short(by_id[r["_near_train_id"]])) for _, r in flagged.iloc[picks].iterrows()]
    shingle = f"{cfg.shingle.unit} {cfg.shingle.n}-grams"
    return NearDuplicateReport(
        checked=len(ev), pairs=len(flagged), share=round(len(flagged) / max(len(ev), 1), 4),
        by_split={s: int((flagged["_split"] == s).sum()) for s in EVALUATED}, similarity=cfg.similarity,
        shingle=shingle, max_share=cfg.max_share, action=cfg.action, success=not failed,
        quarantined=quarantined, examples=examples)


def print_summary(report: NearDuplicateReport) -> None:
    """Always shown when the check runs: the demo data is leaky by construction, and a
    passing share is worth seeing too."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True, highlight=False)
    verdict = "ok" if report.success else f"over max_share {report.max_share:.0%} -> {report.action}"
    console.print(f"  near-duplicates: {report.pairs} of {report.checked} validation/test tickets "
                  f"({report.share:.1%}) have a training ticket with Jaccard >= {report.similarity:g} "
                  f"({report.shingle}, slot values masked): {verdict}")
    for p in report.examples:
        console.print(f"    {p.ticket_id} ({p.split}) ~ {p.train_ticket_id} (train) {p.similarity:.2f}: "
                      f"{p.text!r} ~ {p.train_text!r}")
