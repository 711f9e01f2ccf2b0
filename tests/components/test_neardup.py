"""validate's near-duplicate leakage check: a validation/test ticket that is a training
ticket with other slot values is found with its similarity, an unrelated one is not; the
sparse chunked product agrees with plain set arithmetic; warn, error and quarantine."""
from __future__ import annotations

import json
import random
import string

import numpy as np
import pandas as pd
import pytest

from components import generate
from components.base import StageError, StageIO
from components.prepare import PrepareSpec
from components.splits import split_of
from components.task import TaskSpec
from components.validate import Checks, ValidateSpec, leakage, run
from components.validate.leakage import NearDuplicates, Shingle, add_columns, mask, nearest, shingles
from llmops.spec import load_spec
from tests.conftest import REPO

SPEC = load_spec(REPO / "pipelines.yaml", env={})
SPLIT = (PrepareSpec().split, PrepareSpec().split_salt)
TEMPLATE = ("Charged twice for {p}", "Hi team,\n\nWe were billed twice this month for {p}. Invoice {inv} shows "
            "the same charge two times; we have {n} seats. Please refund the duplicate.\n\nThanks,\n{name}")


def _random_text(rng: random.Random, words: int) -> str:
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(words))


@pytest.fixture
def data():
    """Demo tables whose tickets are all unrelated texts (no near copies anywhere), and the
    first training and test rows."""
    data = generate.generate(n_tickets=200, n_customers=40, seed=5)
    rng = random.Random(5)
    t = data.tickets
    t["subject"] = [_random_text(rng, 4) for _ in range(len(t))]
    t["body"] = [_random_text(rng, 25) for _ in range(len(t))]
    splits = [split_of(i, *SPLIT) for i in t.ticket_id]
    return data, splits.index("train"), splits.index("test")


def _plant_copy(data, train: int, test: int) -> None:
    """The test ticket becomes the training ticket's template with other slot values."""
    t, names = data.tickets, dict(zip(data.customers.customer_id, data.customers.name))
    t.loc[train, "subject"], body = TEMPLATE[0].format(p="Tessera Sync"), TEMPLATE[1]
    t.loc[train, "body"] = body.format(p="Tessera Sync", inv="INV-26843", n=12, name=names[t.customer_id[train]])
    t.loc[test, "subject"] = TEMPLATE[0].format(p="Tessera Sync")
    t.loc[test, "body"] = body.format(p="Tessera Sync", inv="INV-90210", n=480, name=names[t.customer_id[test]])
    assert names[t.customer_id[train]] != names[t.customer_id[test]]


def _columns(data, cfg: NearDuplicates = NearDuplicates()) -> pd.DataFrame:
    df = data.tickets.copy()
    df["_split"] = [split_of(i, *SPLIT) for i in df.ticket_id]
    add_columns(df, df.subject + "\n" + df.body, cfg, data.customers)
    return df


def test_a_copy_with_other_slot_values_is_found(data):
    data, train, test = data
    _plant_copy(data, train, test)
    df = _columns(data)
    flagged = df[df._near_duplicate.eq(True)]
    assert list(flagged.ticket_id) == [df.ticket_id[test]]
    # numbers, the invoice id and the name are masked: the two texts are the same
    assert flagged._near_train_id.tolist() == [df.ticket_id[train]] and flagged._near_similarity.tolist() == [1.0]
    assert df[df._split == "train"]._near_duplicate.isna().all()  # training rows are not evaluated
    # another product: a few shingles differ, the similarity drops but stays over 0.35
    data.tickets.loc[test, "body"] = data.tickets.body[test].replace("Tessera Sync", "the chart builder")
    near = _columns(data).loc[test]
    assert near._near_duplicate and 0.5 < near._near_similarity < 1.0


def test_an_unrelated_ticket_is_not(data):
    data, train, test = data
    df = _columns(data)
    evaluated = df[df._split != "train"]
    assert not evaluated._near_duplicate.any() and evaluated._near_similarity.max() < 0.05


def test_mask_replaces_slot_values():
    texts = pd.Series(["Invoice INV-48213: 384 seats, error E512, mail jane.doe@example.com\nJane Doe"])
    assert mask(texts, pd.Series(["Jane Doe"]))[0] == "invoice  id :  num  seats, error  id , mail  email \n name "


@pytest.mark.parametrize("shingle", [Shingle(unit="words", n=3), Shingle(unit="chars", n=5)])
def test_sparse_jaccard_agrees_with_sets_in_small_chunks(monkeypatch, shingle):
    demo = generate.generate(n_tickets=120, n_customers=30, seed=11).tickets
    texts = mask(demo.subject + "\n" + demo.body)
    monkeypatch.setattr(leakage, "CELLS", 250)  # 2 query rows per product: many chunks
    x = shingles(texts, shingle)
    best, score = nearest(x[:20], x[20:])

    def grams(text: str) -> set:
        if shingle.unit == "chars":
            text = " ".join(text.split())
            return {text[i:i + shingle.n] for i in range(len(text) - shingle.n + 1)}
        words = pd.Series([text]).str.findall(r"(?u)\b\w+\b")[0]
        return {tuple(words[i:i + shingle.n]) for i in range(len(words) - shingle.n + 1)}

    sets = [grams(t) for t in texts]
    for q in range(20):
        jac = np.array([len(sets[q] & s) / len(sets[q] | s) for s in sets[20:]])
        assert score[q] == pytest.approx(jac.max(), abs=1e-9)
        assert best[q] == int(np.argmax(jac))  # the lowest row on ties


def _validate(tmp_path, data, **near):
    checks = Checks(text={"enabled": False}, leakage={"near_duplicates": {"max_share": 0, **near}})
    data.write(tmp_path / "ingest")
    out = tmp_path / "validate"
    out.mkdir()
    io = StageIO(pipeline="t", out_dir=out, inputs={"ingest": tmp_path / "ingest"}, state_dir=SPEC.state_dir(REPO),
                 models=dict(SPEC.models), sections={"prepare": PrepareSpec(), "task": TaskSpec()})
    return run(ValidateSpec(checks=checks), io), out


def test_warn_records_the_pair_and_goes_on(tmp_path, data, capsys):
    data, train, test = data
    _plant_copy(data, train, test)
    result, out = _validate(tmp_path, data)
    report = json.loads((out / "validation.json").read_text())
    assert report["success"] and report["failed_warnings"] == 1 and report["rows_out"] == 200
    near = report["near_duplicates"]
    assert (near["pairs"], near["by_split"]["test"], near["success"], near["quarantined"]) == (1, 1, False, 0)
    assert near["share"] == round(1 / near["checked"], 4)
    (pair,) = near["examples"]
    assert (pair["ticket_id"], pair["train_ticket_id"], pair["similarity"]) == (
        data.tickets.ticket_id[test], data.tickets.ticket_id[train], 1.0)
    assert pair["text"].startswith("Charged twice for Tessera Sync Hi team, We were billed")
    assert result.report.near_duplicates.pairs == 1
    err = capsys.readouterr().err
    assert f"near-duplicates: 1 of {near['checked']} validation/test tickets" in err
    assert f"{data.tickets.ticket_id[test]} (test) ~ {data.tickets.ticket_id[train]} (train) 1.00" in err
    docs = (out / "data_docs" / "index.html").read_text()
    assert "near_duplicates" in docs


def test_error_stops_naming_the_check(tmp_path, data):
    data, train, test = data
    _plant_copy(data, train, test)
    with pytest.raises(StageError, match=r"leakage on subject\+body \(near-duplicate\)"):
        _validate(tmp_path, data, action="error")


def test_within_max_share_passes(tmp_path, data):
    data, train, test = data
    _plant_copy(data, train, test)
    result, out = _validate(tmp_path, data, action="error", max_share=0.1)
    assert result.report.failed_errors == 0 and result.report.near_duplicates.success


def test_quarantine_sets_the_copy_aside_with_its_reason(tmp_path, data):
    data, train, test = data
    _plant_copy(data, train, test)
    result, out = _validate(tmp_path, data, action="quarantine")
    kept = pd.read_parquet(out / "tickets.parquet")
    assert len(kept) == 199 and data.tickets.ticket_id[test] not in set(kept.ticket_id)
    (row,) = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert row["ticket_id"] == data.tickets.ticket_id[test]
    assert row["reasons"] == [f"leakage: near-duplicate of training ticket {data.tickets.ticket_id[train]} "
                              "(similarity 1.00 >= 0.35)"]
    assert result.report.quarantined == 1 and result.report.near_duplicates.quarantined == 1
