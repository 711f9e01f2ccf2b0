"""The demo generator: determinism, labelling rules, profile history, shifted traffic."""
from __future__ import annotations

import itertools

import pandas as pd
import pytest

from components import generate
from components.base import file_sha256
from components.generate import PLANS, PRIORITIES, priority_for


def test_same_seed_gives_identical_files(tmp_path):
    a = generate.generate(n_tickets=200, n_customers=40, seed=11).write(tmp_path / "a")
    b = generate.generate(n_tickets=200, n_customers=40, seed=11).write(tmp_path / "b")
    for name in a:
        assert file_sha256(a[name]) == file_sha256(b[name]), name


def test_other_seed_gives_other_tickets():
    a = generate.generate(n_tickets=100, n_customers=30, seed=1).tickets
    b = generate.generate(n_tickets=100, n_customers=30, seed=2).tickets
    assert (a.body != b.body).mean() > 0.9


def test_default_size_and_shape():
    data = generate.generate()
    assert len(data.tickets) == 2000
    assert len(data.customers) == 300
    assert len(data.articles) == 40  # 8 intents x 5 products, within the 30-60 asked for
    assert data.tickets.ticket_id.is_unique and data.articles.article_id.is_unique
    assert set(data.tickets.article_id) <= set(data.articles.article_id)
    assert set(data.tickets.customer_id) <= set(data.customers.customer_id)
    assert set(data.tickets.intent) == set(generate.INTENTS)
    assert set(data.tickets.priority) == set(PRIORITIES)
    # every class is well represented: no label below 10% of an even share
    assert data.tickets.intent.value_counts().min() > 0.1 * 2000 / len(generate.INTENTS)
    assert data.tickets.priority.value_counts().min() > 0.1 * 2000 / len(PRIORITIES)


@pytest.mark.parametrize(
    ("intent", "impact", "plan", "open_tickets", "tenure", "expected"),
    [
        ("bug_report", 0, "starter", 0, 400, "medium"),   # 1
        ("bug_report", 0, "free", 0, 400, "low"),         # 1 - 1
        ("bug_report", 0, "enterprise", 0, 400, "high"),  # 1 + 1
        ("bug_report", 2, "enterprise", 5, 10, "urgent"),  # 1 + 2 + 1 + 1 + 1, clamped
        ("feature_request", -1, "free", 0, 400, "low"),   # 0 - 1 - 1, clamped
        ("feature_request", 1, "pro", 3, 400, "high"),    # 0 + 1 + 0 + 1
        ("login_problem", 1, "starter", 2, 29, "urgent"),  # 1 + 1 + 0 + 0 + 1
        ("login_problem", 1, "starter", 2, 30, "high"),   # tenure 30 is no longer new
    ],
)
def test_priority_rule(intent, impact, plan, open_tickets, tenure, expected):
    assert priority_for(intent, impact, plan, open_tickets, tenure) == expected


def test_higher_plan_never_lowers_priority():
    for intent, impact, open_tickets, tenure in itertools.product(
            generate.INTENTS, (-1, 0, 1, 2), (0, 3), (5, 400)):
        ranks = [PRIORITIES.index(priority_for(intent, impact, plan, open_tickets, tenure)) for plan in PLANS]
        assert ranks == sorted(ranks), (intent, impact, open_tickets, tenure, ranks)


def profiles_as_of(tickets: pd.DataFrame, profiles: pd.DataFrame) -> pd.DataFrame:
    """Reference as-of join (pandas): each ticket with the latest snapshot at or before it."""
    left = tickets.assign(_order=range(len(tickets))).sort_values("created_at")
    joined = pd.merge_asof(left, profiles.sort_values("event_timestamp"), left_on="created_at",
                           right_on="event_timestamp", by="customer_id", direction="backward")
    return joined.sort_values("_order").reset_index(drop=True)


def test_gold_priority_uses_the_profile_as_of_the_ticket():
    data = generate.generate(n_tickets=1500, n_customers=120, seed=5)
    joined = profiles_as_of(data.tickets, data.customer_profiles)
    recomputed = [priority_for(r.intent, int(r.urgency), r.plan, int(r.open_tickets_30d), int(r.tenure_days))
                  for r in joined.itertuples()]
    assert recomputed == list(joined.priority)
    # With each customer's latest profile instead (a leak from the future), labels disagree.
    latest = data.customer_profiles.sort_values("event_timestamp").groupby("customer_id").tail(1)
    leaked = data.tickets.merge(latest, on="customer_id")
    wrong = sum(priority_for(r.intent, int(r.urgency), r.plan, int(r.open_tickets_30d), int(r.tenure_days))
                != r.priority for r in leaked.itertuples())
    assert wrong > 0.1 * len(leaked)


def test_profiles_change_over_time():
    data = generate.generate(n_tickets=10, n_customers=200, seed=7)
    changes = list(generate.iter_profile_changes(data.customer_profiles))
    customers_with_changes = {c for c, *_ in changes}
    assert len(customers_with_changes) > 0.3 * 200
    assert all(old != new for _, _, old, new in changes)
    # tenure grows with time within a customer
    for _, g in data.customer_profiles.groupby("customer_id"):
        assert g.sort_values("event_timestamp").tenure_days.is_monotonic_increasing


def test_tickets_come_after_signup():
    data = generate.generate(n_tickets=500, n_customers=80, seed=9)
    merged = data.tickets.merge(data.customers, on="customer_id")
    assert (merged.created_at >= merged.signup_at).all()


def test_ticket_text_names_its_product_or_its_vocabulary():
    data = generate.generate(n_tickets=400, n_customers=50, seed=4)
    for row in data.tickets.itertuples():
        words = (f"Tessera {row.product}", *generate.PRODUCTS[row.product])
        assert any(w in row.body for w in words), row.body


def test_shifts_change_the_traffic_but_not_the_customers():
    base = generate.generate(n_tickets=300, n_customers=50, seed=7)
    mean_len = base.tickets.body.str.len().mean()
    shifted = {kind: generate.generate(n_tickets=300, n_customers=50, seed=7, shift=kind) for kind in generate.SHIFTS}
    for data in shifted.values():
        pd.testing.assert_frame_equal(data.customers, base.customers)
        pd.testing.assert_frame_equal(data.customer_profiles, base.customer_profiles)
    assert (shifted["language"].tickets.language == "es").all()
    assert shifted["long"].tickets.body.str.len().mean() > 5 * mean_len
    assert shifted["spam"].tickets.intent.isna().all()
    vault = shifted["new_product"].tickets
    assert (vault["product"] == "Vault").all() and vault.article_id.isna().all()
    assert vault.body.str.contains("vault|key|secret", case=False).mean() > 0.9
    assert not base.tickets.body.str.contains("vault", case=False).any()


def test_shift_fraction_mixes_traffic():
    data = generate.generate(n_tickets=1000, n_customers=50, seed=7, shift="language", shift_fraction=0.3)
    share = (data.tickets.language == "es").mean()
    assert 0.25 < share < 0.35


@pytest.mark.parametrize("kwargs", [{"shift": "sarcasm"}, {"n_tickets": 0}, {"shift_fraction": 1.5}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        generate.generate(**kwargs)
