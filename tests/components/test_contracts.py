"""validate's data contracts: each rule caught on the demo data broken in exactly that way
(the demo data itself passes every contract: test_validate), point-in-time coverage,
quarantine across tables, and contracts that cannot hold refused at load.

The defects sit in disjoint rows, tables and columns, so one validation run judges them all
(each run costs ~10 s): every defect must fail exactly its own expectation, and nothing else
may fail."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import ValidationError

from components import generate
from components.base import StageError
from components.validate import Checks, ValidateSpec
from components.validate.contracts import DEFAULTS, ColumnContract, Contracts, TableContract
from components.validate.suites import where
from tests.components.test_validate import _failure, _validate

pytestmark = pytest.mark.usefixtures("validate_tokenizer")

NOT_NULL = "expect_column_values_to_not_be_null"
IN_SET = "expect_column_values_to_be_in_set"


@pytest.fixture(scope="module")
def broken(tmp_path_factory, validate_tokenizer):
    """(the broken data, {(check, table.column, expectation): failed report row}, error)."""
    d = generate.generate(n_tickets=300, n_customers=60, seed=3)
    t, p, c, a = d.tickets, d.customer_profiles, d.customers, d.articles
    gone = t.customer_id[9]  # a customer whose profiles are all missing: coverage
    d.customer_profiles = p = p[p.customer_id != gone].reset_index(drop=True)
    null_row = int(t.index[t.customer_id == gone][0])
    t.loc[null_row, "customer_id"] = None  # that customer's ticket: coverage fails for it either way
    t.loc[6, "channel"] = "fax"
    others = p.index[p.customer_id != p.customer_id[0]]  # customer 0's profiles stay intact
    p.loc[others[0], "plan"] = "gold"
    p.loc[others[1], "plan"] = None
    p.loc[others[2], "tenure_days"] = -3
    p["open_tickets_30d"] = p["open_tickets_30d"].astype(str)
    p.loc[others[3], "open_tickets_30d"] = "many"
    p.loc[len(p)] = p.loc[others[4]]  # the same customer and time twice
    p.loc[others[5], "customer_id"] = "CUST-0999"
    first = p[p.customer_id == p.customer_id[0]].event_timestamp.idxmin()
    p.loc[first, "event_timestamp"] = pd.Timestamp("2001-01-01", tz="UTC")
    c["signup_at"] = c["signup_at"].astype(str)
    c.loc[c.index[-1], "signup_at"] = "yesterday"
    c.loc[len(c)] = c.loc[2]  # a customer listed twice
    a.loc[2, "title"] = "  "
    a.loc[4, "body"] = None
    tmp = tmp_path_factory.mktemp("contracts")
    with pytest.raises(StageError) as err:
        _validate(tmp, d)
    report = json.loads((tmp / "validate" / "validation.json").read_text())
    failed = {(r["check"], where(r), r["expectation"].split(" (")[0]): r for r in report["checks"] if not r["success"]}
    return d, failed, str(err.value), {"gone": gone, "null_row": null_row, "others": others, "first": first}


def test_nothing_but_the_defects_fails(broken):
    assert set(broken[1]) == {
        ("contract", "customer_id", NOT_NULL), ("contract", "channel", IN_SET),
        ("coverage", "customer_id+created_at", IN_SET),
        ("contract", "customer_profiles.plan", IN_SET), ("contract", "customer_profiles.plan", NOT_NULL),
        ("contract", "customer_profiles.tenure_days", "expect_column_values_to_be_between"),
        ("contract", "customer_profiles.open_tickets_30d", IN_SET),
        ("contract", "customer_profiles.customer_id+event_timestamp", IN_SET),
        ("references", "customer_profiles.customer_id", IN_SET),
        ("time", "customer_profiles.event_timestamp", IN_SET),
        ("contract", "customers.signup_at", IN_SET), ("contract", "customers.customer_id", IN_SET),
        ("contract", "articles.title", IN_SET), ("contract", "articles.body", NOT_NULL)}
    assert broken[2].startswith("validation failed: 14 error-level expectation(s): ")
    assert "contract on customer_profiles.plan" in broken[2] and "coverage on customer_id+created_at" in broken[2]


def test_a_ticket_with_a_null_customer(broken):
    d, failed, _, at = broken
    row = failed[("contract", "customer_id", NOT_NULL)]
    assert row["examples"] == [d.tickets.ticket_id[at["null_row"]]] and row["table"] == "tickets"


def test_a_ticket_channel_outside_the_contract(broken):
    row = broken[1][("contract", "channel", IN_SET)]
    assert 'e.g. ["fax"]' in row["observed"] and "web_form" in row["threshold"]
    assert row["examples"] == [broken[0].tickets.ticket_id[6]]


def test_tickets_without_a_profile_as_of_their_time(broken):
    d, failed, _, at = broken
    expected = sorted(d.tickets.ticket_id[(d.tickets.customer_id == at["gone"]) | d.tickets.customer_id.isna()])
    row = failed[("coverage", "customer_id+created_at", IN_SET)]
    assert row["observed"].startswith(f"{len(expected)} of 300 rows") and sorted(row["examples"]) == expected[:5]


def test_a_plan_outside_the_allowed_values_and_a_null_plan(broken):
    d, failed, _, at = broken
    p = d.customer_profiles.loc[at["others"][0]]
    row = failed[("contract", "customer_profiles.plan", IN_SET)]
    assert 'e.g. ["gold"]' in row["observed"] and row["examples"] == [f"{p.customer_id}/{p.event_timestamp}"]
    assert failed[("contract", "customer_profiles.plan", NOT_NULL)]["observed"].startswith("1 of ")


def test_a_count_out_of_range_and_one_that_is_not_an_integer(broken):
    failed = broken[1]
    row = failed[("contract", "customer_profiles.tenure_days", "expect_column_values_to_be_between")]
    assert "e.g. [-3]" in row["observed"] and row["threshold"] == "between 0 and 36500"
    row = failed[("contract", "customer_profiles.open_tickets_30d", IN_SET)]
    assert "parses as integer" in row["expectation"] and row["observed"].startswith("1 of ")


def test_a_repeated_key_an_unknown_customer_and_a_profile_older_than_its_customer(broken):
    failed = broken[1]
    assert "unique key" in failed[("contract", "customer_profiles.customer_id+event_timestamp", IN_SET)]["expectation"]
    assert 'e.g. ["CUST-0999"]' in failed[("references", "customer_profiles.customer_id", IN_SET)]["observed"]
    row = failed[("time", "customer_profiles.event_timestamp", IN_SET)]
    assert "not before customers.signup_at" in row["expectation"] and row["examples"][0].endswith("2001-01-01 00:00:00+00:00")


def test_a_signup_that_does_not_parse_and_a_customer_listed_twice(broken):
    d, failed = broken[0], broken[1]
    assert "parses as timestamp" in failed[("contract", "customers.signup_at", IN_SET)]["expectation"]
    assert failed[("contract", "customers.customer_id", IN_SET)]["examples"] == [d.customers.customer_id[2]]


def test_a_blank_article_title_and_a_null_body(broken):
    d, failed = broken[0], broken[1]
    assert failed[("contract", "articles.title", IN_SET)]["examples"] == [d.articles.article_id[2]]
    assert failed[("contract", "articles.body", NOT_NULL)]["examples"] == [d.articles.article_id[4]]


def test_a_profile_older_than_max_age_is_no_coverage(tmp_path, data):
    profiles = data.customer_profiles
    first = profiles.loc[profiles.groupby("customer_id").event_timestamp.idxmin()].set_index("customer_id")
    data.customer_profiles = first.reset_index()  # only each customer's first snapshot
    age = data.tickets.created_at - data.tickets.customer_id.map(first.event_timestamp)
    expected = int((age > pd.Timedelta(days=30)).sum())
    assert 0 < expected < 300
    row = _failure(tmp_path, data, "coverage", "customer_id+created_at", coverage={"max_age_days": 30})
    assert row["observed"].startswith(f"{expected} of 300 rows")


def test_quarantine_follows_a_bad_article_to_the_tickets_that_name_it(tmp_path, data):
    article = data.tickets.article_id[0]
    data.articles.loc[data.articles.article_id == article, "title"] = ""
    labelled = set(data.tickets.ticket_id[data.tickets.article_id == article])
    result, out = _validate(tmp_path, data, ValidateSpec(on_fail="quarantine"))
    lines = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["table"], q["article_id"]) for q in lines if q["table"] == "articles"] == [("articles", article)]
    assert {q["ticket_id"] for q in lines if q["table"] == "tickets"} == labelled
    assert all("labels" in r for q in lines if q["table"] == "tickets" for r in q["reasons"])
    assert article not in set(pd.read_parquet(out / "articles.parquet").article_id)
    assert result.metrics["rows_out"] == 300 - len(labelled)
    summary = json.loads((out / "validation.json").read_text())
    assert summary["quarantined_by_table"] == {"articles": 1, "tickets": len(labelled)}


def test_contracts_that_cannot_hold_are_refused_when_the_spec_loads():
    with pytest.raises(ValidationError, match="checks.references moved into the tickets' contract"):
        Checks(references={"severity": "error"})  # a spec written before contracts
    with pytest.raises(ValidationError, match="min/max need type integer or number"):
        ColumnContract(type="string", min=1)
    with pytest.raises(ValidationError, match="key columns \\['id'\\] are not in columns"):
        TableContract(key=["id"], columns={})
    with pytest.raises(ValidationError, match="must name a table checked before customers"):
        Contracts(customers=DEFAULTS["customers"].model_copy(update={"columns": {
            "customer_id": ColumnContract(references="tickets.ticket_id")}}))
    with pytest.raises(ValidationError, match="declares no column 'id'"):
        Contracts(articles=TableContract(columns={"customer": ColumnContract(references="customers.id")}))
    with pytest.raises(ValidationError, match="needs a column of articles with references: customers"):
        Contracts(articles=TableContract(columns={"when": ColumnContract(type="timestamp",
                                                                         after="customers.signup_at")}))
