"""Deterministic generator of the demo task: support-ticket triage for "Tessera", a
fictional software company with five products. How tickets are worded (subjects, bodies,
greetings, impact phrases, typos) lives in components/phrasings.py.

Four tables come out (same seed, same bytes):

- ``customers``: one row per customer (id, name, company, country, signup time);
- ``customer_profiles``: the customer's profile over time, a snapshot every ~2 weeks
  (plan, tenure_days, open_tickets_30d, seats) with its ``event_timestamp``; plans
  change over time, so *which* snapshot a ticket sees matters;
- ``articles``: help-center articles, one per (intent, product): 8 x 5 = 40;
- ``tickets``: subject, body, channel, customer, time, the gold labels ``intent``,
  ``priority`` and ``article_id``, and the annotations ``product``, ``urgency``
  (how urgent the text says it is, -1..2), which explain the labels, and ``phrasing``
  (``seen``; ``unseen`` for the ``unseen_share`` of tickets worded in templates,
  greetings, sign-offs and impact phrases that no ``seen`` ticket uses, with typos;
  the shift's name for shifted traffic).

Labelling rules (what a model has to learn):
- ``intent`` and ``article_id`` come from the text: the ticket is written about one
  product and one intent, and the gold article is that (intent, product)'s article.
- ``priority`` depends on the text AND the customer's profile as of the ticket's time
  (the latest snapshot at or before ``created_at``); see :func:`priority_for`.

``shift`` produces traffic that differs from training data, for drift monitoring:
``new_product`` (a product the articles do not cover, with new vocabulary),
``language`` (Spanish tickets), ``long`` (very long tickets with pasted logs),
``spam`` (not support tickets at all: no gold labels).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd

from components.phrasings import IMPACT_ES, SEEN, SPAM, TEMPLATES_ES, UNSEEN, typos

INTENTS = (
    "billing_refund",
    "login_problem",
    "bug_report",
    "performance",
    "feature_request",
    "integration_setup",
    "data_export",
    "account_cancellation",
)
PRIORITIES = ("low", "medium", "high", "urgent")
PLANS = ("free", "starter", "pro", "enterprise")
CHANNELS = ("email", "chat", "web_form", "phone")
SHIFTS = ("new_product", "language", "long", "spam")

# Product -> the words customers use for it; tickets mention either the name or a term.
PRODUCTS: dict[str, tuple[str, ...]] = {
    "Sync": ("the desktop sync client", "shared folders", "the sync app"),
    "Boards": ("our dashboards", "the Boards widgets", "the chart builder"),
    "API": ("the REST API", "our API tokens", "the webhooks endpoint"),
    "Mobile": ("the iOS app", "the Android app", "the mobile app"),
    "Inbox": ("the shared inbox", "the Inbox rules", "our team mailbox"),
}
NEW_PRODUCT = ("Vault", ("the key vault", "secret rotation policies", "the HSM connector"))

INTENT_TOPIC = {  # article titles: "<topic> in Tessera <product>"
    "billing_refund": "Refunds and duplicate charges",
    "login_problem": "Fixing sign-in and password problems",
    "bug_report": "Reporting errors and crashes",
    "performance": "Troubleshooting slow loading and timeouts",
    "feature_request": "Suggesting new features",
    "integration_setup": "Setting up integrations (Salesforce, Slack, Zapier)",
    "data_export": "Exporting your data to CSV and backups",
    "account_cancellation": "Cancelling your subscription and closing the account",
}

FIRST = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Grace", "Hiro", "Ines", "Jonas",
         "Kira", "Luis", "Maya", "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
LAST = ("Smith", "Garcia", "Müller", "Chen", "Okafor", "Rossi", "Novak", "Silva", "Kim", "Berg")
COMPANY = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay", "Stark", "Wayne",
           "Soylent", "Tyrell", "Cyberdyne", "Wonka")
COUNTRIES = ("US", "DE", "FR", "GB", "IN", "BR", "ES", "JP", "NG", "CA")
PLAN_WEIGHTS = (0.35, 0.3, 0.25, 0.1)
PLAN_ADJUST = {"free": -1, "starter": 0, "pro": 0, "enterprise": 1}

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
END = datetime(2026, 10, 1, tzinfo=timezone.utc)
SNAPSHOT_EVERY = timedelta(days=14)


def article_id(intent: str, product: str) -> str:
    """Stable id of the (intent, product) article, e.g. ``KB-1203``."""
    return f"KB-{(INTENTS.index(intent) + 1) * 100 + list(PRODUCTS).index(product) + 1}"


def priority_for(intent: str, impact: int, plan: str, open_tickets_30d: int, tenure_days: int) -> str:
    """The gold priority: a score from the text and the customer's profile at ticket time.

    score = 1 (0 for feature requests) + impact (-1..2, from the text)
          + plan (free -1, starter/pro 0, enterprise +1)
          + 1 if the customer has >= 3 open tickets in the last 30 days
          + 1 if the customer is new (tenure < 30 days);
    <= 0 low, 1 medium, 2 high, >= 3 urgent. It never decreases with a higher plan.
    """
    score = (0 if intent == "feature_request" else 1) + impact + PLAN_ADJUST[plan]
    score += int(open_tickets_30d >= 3) + int(tenure_days < 30)
    return PRIORITIES[max(0, min(score, 3))]


@dataclass
class DemoData:
    tickets: pd.DataFrame
    customers: pd.DataFrame
    customer_profiles: pd.DataFrame
    articles: pd.DataFrame

    TABLES = ("tickets", "customers", "customer_profiles", "articles")

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Write every table as Parquet into ``out_dir``; returns name -> path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in self.TABLES:
            path = out_dir / f"{name}.parquet"
            getattr(self, name).to_parquet(path, index=False)
            paths[name] = path
        return paths


def make_articles() -> pd.DataFrame:
    rows = []
    for intent in INTENTS:
        for product, terms in PRODUCTS.items():
            title = f"{INTENT_TOPIC[intent]} in Tessera {product}"
            body = (f"This article explains {INTENT_TOPIC[intent].lower()} for Tessera {product} "
                    f"({', '.join(terms)}). Follow the steps below; if the problem persists, "
                    f"contact support with your account id.")
            rows.append({"article_id": article_id(intent, product), "title": title, "body": body,
                         "product": product, "intent": intent})
    return pd.DataFrame(rows)


def make_customers(rng: random.Random, n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    customers, profiles = [], []
    for i in range(n):
        cid = f"CUST-{i + 1:04d}"
        # A quarter sign up during the window, so some tickets come from new customers.
        if rng.random() < 0.25:
            signup = START + timedelta(days=rng.uniform(0, (END - START).days - 30))
        else:
            signup = START - timedelta(days=rng.uniform(30, 900))
        signup = signup.replace(microsecond=0)
        customers.append({"customer_id": cid, "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                          "company": f"{rng.choice(COMPANY)} {rng.choice(('Ltd', 'Inc', 'GmbH', 'Co'))}",
                          "country": rng.choice(COUNTRIES), "signup_at": signup})
        plan = rng.choices(PLANS, PLAN_WEIGHTS)[0]
        busy = rng.uniform(0.3, 3.0)  # how many tickets this customer tends to have open
        seats = rng.randint(1, 5) * (1 + PLANS.index(plan) * 10)
        t = max(signup, START - SNAPSHOT_EVERY)
        while t < END:
            # Plans drift: mostly stay, sometimes up or down one step.
            step = rng.random()
            if step < 0.05 and plan != PLANS[-1]:
                plan = PLANS[PLANS.index(plan) + 1]
            elif step < 0.08 and plan != PLANS[0]:
                plan = PLANS[PLANS.index(plan) - 1]
            profiles.append({"customer_id": cid, "event_timestamp": t, "plan": plan,
                             "tenure_days": (t - signup).days,
                             "open_tickets_30d": min(_poisson(rng, busy), 9), "seats": seats})
            t += SNAPSHOT_EVERY + timedelta(hours=rng.randint(-48, 48))
    return pd.DataFrame(customers), pd.DataFrame(profiles)


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method: fine for the small rates used here, and stable across platforms.
    limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _details(rng: random.Random) -> dict[str, str]:
    """Values for a template's {n} (a count), {inv} (an invoice) and {code} (an error code)."""
    return {"n": str(rng.randint(2, 500)), "inv": f"INV-{rng.randint(10000, 99999)}",
            "code": f"E{rng.randint(100, 999)}"}


def _long_tail(rng: random.Random) -> str:
    lines = [f"[{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}] "
             f"worker-{rng.randint(1, 9)} {rng.choice(('WARN', 'ERROR', 'INFO'))} "
             f"request id={rng.getrandbits(48):012x} latency={rng.randint(5, 9000)}ms"
             for _ in range(rng.randint(25, 60))]
    history = " ".join(rng.choice((
        "We already restarted everything and cleared the cache.",
        "Our IT department checked the firewall and proxy settings.",
        "The same thing happened last quarter and was fixed by itself.",
        "I attach the full log below so you can see the whole sequence.",
    )) for _ in range(6))
    return f"\n\n{history}\n\nLog excerpt:\n" + "\n".join(lines)


def generate(n_tickets: int = 2000, n_customers: int = 300, seed: int = 7,
             shift: str | None = None, shift_fraction: float = 1.0, unseen_share: float = 0.0) -> DemoData:
    """Generate the demo tables. Same arguments, same data, on any machine.

    ``shift`` (one of SHIFTS) makes ``shift_fraction`` of the tickets shifted traffic;
    customers, profiles and articles are the same as without a shift, so shifted
    traffic can be compared with the training data.
    ``unseen_share`` of the tickets (rounded; shifted ones excepted) are worded in the
    unseen phrasing (column ``phrasing``); every other ticket is the same, byte for byte,
    as with ``unseen_share=0``: the same ticket, labels and customer, in other words.
    Raises ValueError for an unknown shift, non-positive sizes or a share outside [0, 1].
    """
    if shift is not None and shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; expected one of {', '.join(SHIFTS)}")
    if n_tickets <= 0 or n_customers <= 0:
        raise ValueError(f"n_tickets and n_customers must be > 0 (got {n_tickets}, {n_customers})")
    if not 0.0 <= shift_fraction <= 1.0:
        raise ValueError(f"shift_fraction must be within [0, 1] (got {shift_fraction})")
    if not 0.0 <= unseen_share <= 1.0:
        raise ValueError(f"unseen_share must be within [0, 1] (got {unseen_share})")
    rng = random.Random(seed)
    customers, profiles = make_customers(rng, n_customers)
    articles = make_articles()
    # Tickets draw from their own stream, so a shift does not change the customers.
    trng = random.Random(f"{seed}-tickets-{shift}")
    # Rewording draws from a third stream: the tickets' own draws (hence every seen ticket) stay put.
    prng = random.Random(f"{seed}-phrasing")
    unseen = set(prng.sample(range(n_tickets), round(unseen_share * n_tickets)))
    # Per customer: snapshot times (sorted) and rows, for an as-of lookup by bisection.
    by_customer = {cid: (list(g.event_timestamp), g.to_dict("records"))
                   for cid, g in profiles.sort_values("event_timestamp").groupby("customer_id")}
    signup = dict(zip(customers.customer_id, customers.signup_at))
    names = dict(zip(customers.customer_id, customers.name))
    cids = list(customers.customer_id)
    rows = []
    for i in range(n_tickets):
        cid = trng.choice(cids)
        lo = max(signup[cid], START)
        created = (lo + timedelta(seconds=trng.uniform(0, (END - lo).total_seconds() - 1))).replace(microsecond=0)
        times, snaps = by_customer[cid]
        snap = snaps[bisect.bisect_right(times, created) - 1]  # latest snapshot <= created
        shifted = shift is not None and trng.random() < shift_fraction
        if shifted:
            row, phrasing = _SHIFT_MAKERS[shift](trng, names[cid], snap), shift
        else:
            reword = prng if i in unseen else None
            row, phrasing = _normal_ticket(trng, names[cid], snap, reword=reword), "unseen" if reword else "seen"
        prefix = f"TCK-{shift[:4].upper()}" if shifted else "TCK"
        rows.append({"ticket_id": f"{prefix}-{i + 1:06d}", "customer_id": cid, "created_at": created,
                     **row, "phrasing": phrasing})
    tickets = pd.DataFrame(rows)
    for col in ("intent", "priority", "article_id", "product", "phrasing"):
        tickets[col] = tickets[col].astype("string")
    tickets["urgency"] = tickets["urgency"].astype("Int8")
    return DemoData(tickets=tickets, customers=customers, customer_profiles=profiles, articles=articles)


def _normal_ticket(rng: random.Random, name: str, snap: dict, *, long: bool = False,
                   reword: random.Random | None = None) -> dict:
    """A ticket in the seen phrasing; with ``reword``, the same ticket (intent, product,
    urgency, channel, details) in the unseen phrasing with typos, drawn from ``reword``
    (``rng`` draws the same either way)."""
    intent = rng.choice(INTENTS)
    product = rng.choice(list(PRODUCTS))
    # Most tickets name the product; some only use its vocabulary, which retrieval must map.
    ref = f"Tessera {product}" if rng.random() < 0.7 else rng.choice(PRODUCTS[product])
    impact = rng.choices((-1, 0, 1, 2), (0.2, 0.4, 0.25, 0.15))[0]
    subject = rng.choice(SEEN.subjects[intent]).format(name=f"Tessera {product}")
    body_template = rng.choice(SEEN.bodies[intent])
    details = _details(rng)
    channel = rng.choices(CHANNELS, (0.45, 0.3, 0.2, 0.05))[0]
    text = SEEN.wrap(rng, channel, body_template.format(p=ref, **details), rng.choice(SEEN.impact[impact]), name)
    if reword is not None:
        subject = typos(reword, reword.choice(UNSEEN.subjects[intent])).format(name=f"Tessera {product}")
        body = typos(reword, reword.choice(UNSEEN.bodies[intent])).format(p=ref, **details)
        text = UNSEEN.wrap(reword, channel, body, typos(reword, reword.choice(UNSEEN.impact[impact])), name)
    if long:
        text += _long_tail(rng)
    return {"channel": channel, "language": "en", "subject": subject, "body": text,
            "intent": intent, "product": product, "article_id": article_id(intent, product),
            "urgency": impact,
            "priority": priority_for(intent, impact, snap["plan"], snap["open_tickets_30d"], snap["tenure_days"])}


def _new_product_ticket(rng: random.Random, name: str, snap: dict) -> dict:
    product, terms = NEW_PRODUCT
    intent = rng.choice(INTENTS)
    impact = rng.choices((-1, 0, 1, 2), (0.2, 0.4, 0.25, 0.15))[0]
    ref = f"Tessera {product}" if rng.random() < 0.5 else rng.choice(terms)
    body = rng.choice(SEEN.bodies[intent]).format(p=ref, **_details(rng))
    body += " " + rng.choice(("Key rotation fails for the HSM-backed secrets.",
                              "The vault policy editor rejects our envelope encryption rules.",
                              "Audit trails for secret access are missing since the KMS migration."))
    channel = rng.choice(CHANNELS)
    return {"channel": channel, "language": "en",
            "subject": rng.choice(SEEN.subjects[intent]).format(name=f"Tessera {product}"),
            "body": SEEN.wrap(rng, channel, body, rng.choice(SEEN.impact[impact]), name),
            "intent": intent, "product": product, "article_id": None,  # no article covers it
            "urgency": impact,
            "priority": priority_for(intent, impact, snap["plan"], snap["open_tickets_30d"], snap["tenure_days"])}


def _spanish_ticket(rng: random.Random, name: str, snap: dict) -> dict:
    intent = rng.choice(INTENTS)
    product = rng.choice(list(PRODUCTS))
    impact = rng.choices((-1, 0, 1, 2), (0.2, 0.4, 0.25, 0.15))[0]
    body = rng.choice(TEMPLATES_ES[intent]).format(p=f"Tessera {product}", **_details(rng))
    return {"channel": rng.choice(CHANNELS), "language": "es", "subject": f"Consulta sobre Tessera {product}",
            "body": f"Hola,\n\n{body} {IMPACT_ES[impact]}\n\nSaludos,\n{name}",
            "intent": intent, "product": product, "article_id": article_id(intent, product),
            "urgency": impact,
            "priority": priority_for(intent, impact, snap["plan"], snap["open_tickets_30d"], snap["tenure_days"])}


def _spam_ticket(rng: random.Random, name: str, snap: dict) -> dict:
    url = f"http://{rng.choice(('best-deals', 'win-now', 'seo-boost'))}.example/{rng.getrandbits(24):06x}"
    body = " ".join(rng.choice(SPAM).format(url=url) for _ in range(rng.randint(1, 3)))
    return {"channel": rng.choice(("email", "web_form")), "language": "en",
            "subject": rng.choice(("!!! LIMITED OFFER !!!", "You won", "Partnership opportunity")),
            "body": body.upper() if rng.random() < 0.3 else body,
            "intent": None, "product": None, "article_id": None, "urgency": None, "priority": None}


_SHIFT_MAKERS: dict[str, Callable[..., dict]] = {
    "new_product": _new_product_ticket,
    "language": _spanish_ticket,
    "long": lambda rng, name, snap: _normal_ticket(rng, name, snap, long=True),
    "spam": _spam_ticket,
}


def iter_profile_changes(profiles: pd.DataFrame) -> Iterator[tuple[str, pd.Timestamp, str, str]]:
    """Yield (customer_id, time, old_plan, new_plan) for every plan change; used by tests
    and docs to find customers whose plan changed after a ticket."""
    for cid, g in profiles.sort_values("event_timestamp").groupby("customer_id"):
        plans = list(g.plan)
        times = list(g.event_timestamp)
        for k in range(1, len(plans)):
            if plans[k] != plans[k - 1]:
                yield cid, times[k], plans[k - 1], plans[k]
