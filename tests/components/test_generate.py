"""The demo generator: determinism, labelling rules, profile history, shifted traffic,
the unseen phrasing (no word 4-gram in common with the seen one)."""
from __future__ import annotations

import itertools
import random
import re

import pandas as pd
import pytest

from components import generate, phrasings
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


# ---------------------------------------------------------------- unseen phrasing

def _masked_words(text: str) -> list[str]:
    """Lower-case words of a template with every slot ({p}, {n}, ...) as one token."""
    return re.findall(r"<slot>|[a-z0-9']+", re.sub(r"\{\w+\}", " <slot> ", text.lower()))


def _grams(words: list[str], k: int = 4) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}


def _phrases(p: phrasings.Phrasing) -> list[str]:
    return [t for table in (p.subjects, p.bodies, p.impact) for ts in table.values() for t in ts] + [
        *p.greetings, *p.sign_offs, *p.chat_openers, *p.phone_prefixes]


def test_unseen_templates_share_no_word_4gram_with_seen_ones():
    seen = set().union(*(_grams(_masked_words(t)) for t in _phrases(phrasings.SEEN)))
    shared = {t: _grams(_masked_words(t)) & seen for t in _phrases(phrasings.UNSEEN)}
    assert not any(shared.values()), {t: g for t, g in shared.items() if g}
    # the same intents and urgency levels, each with as many choices
    for table in ("subjects", "bodies", "impact"):
        a, b = getattr(phrasings.SEEN, table), getattr(phrasings.UNSEEN, table)
        assert a.keys() == b.keys() and all(len(b[k]) == 3 for k in b)
    # greetings, sign-offs and the channels' wrappers: no word in common
    wrappers = ("greetings", "sign_offs", "chat_openers", "phone_prefixes")
    seen_words = {w for part in wrappers for t in getattr(phrasings.SEEN, part) for w in _masked_words(t)}
    unseen_words = {w for part in wrappers for t in getattr(phrasings.UNSEEN, part) for w in _masked_words(t)}
    assert not seen_words & unseen_words, seen_words & unseen_words


def _mask_ticket(text: str, names: set[str]) -> list[str]:
    """A generated ticket's words with its slot values (products, numbers, codes, names) masked."""
    refs = sorted([f"Tessera {p}" for p in generate.PRODUCTS] + [t for ts in generate.PRODUCTS.values() for t in ts]
                  + sorted(names), key=len, reverse=True)
    for ref in refs:
        text = text.replace(ref, " <slot> ")
    text = re.sub(r"INV-\d+|\bE\d{3}\b|\b\d+\b", " <slot> ", text)
    return re.findall(r"<slot>|[a-z0-9']+", text.lower())


def test_unseen_tickets_share_no_phrasing_with_seen_ones():
    data = generate.generate(n_tickets=1500, n_customers=80, seed=5, unseen_share=0.2)
    names = set(data.customers.name)
    tickets = data.tickets
    assert set(tickets.phrasing) == {"seen", "unseen"}
    seen, unseen = tickets[tickets.phrasing == "seen"], tickets[tickets.phrasing == "unseen"]
    seen_grams = set()
    for row in seen.itertuples():
        seen_grams |= _grams(_mask_ticket(row.body, names)) | _grams(_mask_ticket(row.subject, names))
    for row in unseen.itertuples():
        shared = (_grams(_mask_ticket(row.body, names)) | _grams(_mask_ticket(row.subject, names))) & seen_grams
        assert not shared, (row.body, shared)
    # still about its product, with the slot values as written (typos never touch them)
    for row in unseen.itertuples():
        assert any(w in row.body for w in (f"Tessera {row.product}", *generate.PRODUCTS[row.product])), row.body


def test_unseen_share_is_exact_seeded_and_leaves_every_other_ticket_alone():
    plain = generate.generate(n_tickets=400, n_customers=50, seed=8).tickets
    mixed = generate.generate(n_tickets=400, n_customers=50, seed=8, unseen_share=0.1).tickets
    again = generate.generate(n_tickets=400, n_customers=50, seed=8, unseen_share=0.1).tickets
    pd.testing.assert_frame_equal(mixed, again)  # same seed, same tickets
    other = generate.generate(n_tickets=400, n_customers=50, seed=9, unseen_share=0.1).tickets
    assert set(other.ticket_id[other.phrasing == "unseen"]) != set(mixed.ticket_id[mixed.phrasing == "unseen"])
    assert (plain.phrasing == "seen").all() and (mixed.phrasing == "unseen").sum() == 40
    reworded = mixed.phrasing == "unseen"
    pd.testing.assert_frame_equal(mixed[~reworded], plain[~reworded])
    # a reworded ticket is the same ticket: labels, customer, time and channel; other words
    same = ["ticket_id", "customer_id", "created_at", "channel", "intent", "priority", "article_id", "product",
            "urgency"]
    pd.testing.assert_frame_equal(mixed.loc[reworded, same], plain.loc[reworded, same])
    assert (mixed.body[reworded] != plain.body[reworded]).all()
    assert (mixed.subject[reworded] != plain.subject[reworded]).all()


def test_shifted_tickets_name_their_shift_as_phrasing():
    data = generate.generate(n_tickets=200, n_customers=30, seed=7, shift="long", shift_fraction=0.5,
                             unseen_share=0.2)
    kinds = data.tickets.groupby(data.tickets.ticket_id.str.startswith("TCK-LONG")).phrasing.agg(set)
    assert kinds[True] == {"long"} and kinds[False] == {"seen", "unseen"}


def test_typos_are_seeded_and_spare_slots_and_short_words():
    text = "Please terminate the contract for {p} and our {n} licences before tomorrow morning."
    a = phrasings.typos(random.Random(1), text, rate=0.5)
    assert a == phrasings.typos(random.Random(1), text, rate=0.5) != text
    assert "{p}" in a and "{n}" in a and " the " in a and " and our " in a
    changed = [(x, y) for x, y in zip(text.split(), a.split()) if x != y]
    assert changed and all(abs(len(x) - len(y)) <= 1 and x[0] == y[0] for x, y in changed)
    assert phrasings.typos(random.Random(1), text, rate=0.0) == text


def test_unseen_share_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"unseen_share must be within \[0, 1\] \(got 1.5\)"):
        generate.generate(unseen_share=1.5)
