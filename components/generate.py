"""Deterministic generator of the demo task: support-ticket triage for "Tessera", a
fictional software company with five products. (Long because it holds the demo's phrase
tables: subjects, bodies, greetings and impact phrases per intent and product.)

Four tables come out (same seed, same bytes):

- ``customers``: one row per customer (id, name, company, country, signup time);
- ``customer_profiles``: the customer's profile over time, a snapshot every ~2 weeks
  (plan, tenure_days, open_tickets_30d, seats) with its ``event_timestamp``; plans
  change over time, so *which* snapshot a ticket sees matters;
- ``articles``: help-center articles, one per (intent, product): 8 x 5 = 40;
- ``tickets``: subject, body, channel, customer, time, the gold labels ``intent``,
  ``priority`` and ``article_id``, and the annotations ``product`` and ``urgency``
  (how urgent the text says it is, -1..2), which explain the labels.

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

# Impact phrases: how urgent the writer says it is. Level -1..2 feeds priority_for().
IMPACT: dict[int, tuple[str, ...]] = {
    -1: ("No rush on this.", "Whenever you get a chance.", "Just curious, not urgent."),
    0: ("", "Let me know what you think.", "Thanks for looking into it."),
    1: ("This is blocking my team today.", "We have a deadline this week.",
        "Several colleagues are stuck because of this."),
    2: ("Our production is down because of this!", "All of our users are affected right now.",
        "We are losing money every hour this continues."),
}

# Per intent: subjects and bodies; {p} = product reference; {n}, {inv}, {code} = details.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "billing_refund": {
        "subject": ("Charged twice for {name}", "Refund request for {name}", "Wrong invoice amount"),
        "body": (
            "We were billed twice this month for {p}. Invoice {inv} shows the same charge two times. Please refund the duplicate.",
            "I was charged for {p} after I downgraded. Can I get a refund for invoice {inv}?",
            "The invoice {inv} for {p} has a higher amount than our plan price. Please correct it and refund the difference.",
        ),
    },
    "login_problem": {
        "subject": ("Cannot log in to {name}", "Password reset not working", "Locked out of my account"),
        "body": (
            "I can't sign in to {p}. The password reset e-mail never arrives and I tried {n} times.",
            "Two-factor codes are rejected when I log in to {p}. I have been locked out since this morning ({n} attempts).",
            "After the SSO change I get 'invalid session' when logging into {p}, error code {code}.",
        ),
    },
    "bug_report": {
        "subject": ("Error in {name}", "{name} crashes", "Something is broken in {name}"),
        "body": (
            "{p} crashes every time I open a file larger than {n} MB. Looks like a bug.",
            "When I click save in {p} I get error {code} and my changes are lost.",
            "{p} shows the wrong numbers after the last update; totals are off by {n}.",
        ),
    },
    "performance": {
        "subject": ("{name} is very slow", "Timeouts in {name}", "Slow loading"),
        "body": (
            "{p} takes more than {n} seconds to load since yesterday.",
            "Requests to {p} time out after {n} seconds most of the afternoon.",
            "Everything in {p} is sluggish; simple pages need {n} seconds.",
        ),
    },
    "feature_request": {
        "subject": ("Feature idea for {name}", "Suggestion: {name}", "Could you add this to {name}?"),
        "body": (
            "It would be great if {p} supported dark mode and {n} custom themes.",
            "Please add a way to schedule reports in {p}, e.g. every {n} days.",
            "We would love bulk editing in {p}; we manage {n} items by hand today.",
        ),
    },
    "integration_setup": {
        "subject": ("Connecting {name} to Salesforce", "Help with {name} integration", "Slack integration for {name}"),
        "body": (
            "How do I connect {p} to our Salesforce account? The setup wizard stops at step {n}.",
            "We want {p} to post to Slack. Which permissions does the integration need? We tried {n} times.",
            "I'm setting up the Zapier integration for {p} and the OAuth redirect fails with code {code}.",
        ),
    },
    "data_export": {
        "subject": ("Export data from {name}", "CSV export question", "Need a full backup of {name}"),
        "body": (
            "How can I export all our data from {p} to CSV? We have about {n} records.",
            "The export in {p} stops at {n} rows. We need the complete dataset.",
            "We need a full backup of {p} for an audit; roughly {n} files. What is the best way?",
        ),
    },
    "account_cancellation": {
        "subject": ("Cancel our {name} subscription", "Close my account", "Cancellation request"),
        "body": (
            "Please cancel our subscription to {p} at the end of the month. We have {n} seats.",
            "We decided to stop using {p}. How do I close the account and delete our data? We have {n} users.",
            "I want to cancel {p}; we moved to another tool. Our account has {n} seats.",
        ),
    },
}

# Spanish versions for the `language` shift (same intents and labels).
TEMPLATES_ES: dict[str, tuple[str, ...]] = {
    "billing_refund": ("Nos cobraron dos veces por {p}. La factura {inv} muestra el mismo cargo. Pedimos el reembolso.",),
    "login_problem": ("No puedo iniciar sesión en {p}. El correo para restablecer la contraseña no llega ({n} intentos).",),
    "bug_report": ("{p} se cierra cada vez que abro un archivo de más de {n} MB. Parece un error.",),
    "performance": ("{p} tarda más de {n} segundos en cargar desde ayer.",),
    "feature_request": ("Sería genial que {p} tuviera modo oscuro y {n} temas personalizados.",),
    "integration_setup": ("¿Cómo conecto {p} con Salesforce? El asistente se detiene en el paso {n}.",),
    "data_export": ("¿Cómo exporto todos nuestros datos de {p} a CSV? Tenemos unos {n} registros.",),
    "account_cancellation": ("Por favor cancelen nuestra suscripción a {p} a fin de mes. Tenemos {n} usuarios.",),
}
IMPACT_ES = {-1: "No es urgente.", 0: "Gracias.", 1: "Esto bloquea a mi equipo hoy.",
             2: "¡Producción está caída por esto!"}

SPAM = (
    "Boost your website ranking today!!! Visit {url} for 90% OFF SEO packages.",
    "Congratulations, you have been selected for a crypto giveaway. Claim at {url} now.",
    "Cheap followers and likes, guaranteed results. Order at {url}. Reply STOP to opt out.",
)

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


def _format(rng: random.Random, channel: str, body: str, impact_text: str, name: str) -> str:
    if channel == "email":
        greeting = rng.choice(("Hi team,", "Hello,", "Dear support,", "Hi there,"))
        sign = rng.choice(("Thanks,", "Best regards,", "Cheers,"))
        return f"{greeting}\n\n{body} {impact_text}".rstrip() + f"\n\n{sign}\n{name}"
    if channel == "chat":
        return f"{rng.choice(('hey', 'hi', 'hello'))} - {body} {impact_text}".rstrip()
    if channel == "phone":
        return f"Call summary: customer reports: {body} {impact_text}".rstrip()
    return f"{body} {impact_text}".rstrip()


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
             shift: str | None = None, shift_fraction: float = 1.0) -> DemoData:
    """Generate the demo tables. Same arguments, same data, on any machine.

    ``shift`` (one of SHIFTS) makes ``shift_fraction`` of the tickets shifted traffic;
    customers, profiles and articles are the same as without a shift, so shifted
    traffic can be compared with the training data.
    Raises ValueError for an unknown shift or non-positive sizes.
    """
    if shift is not None and shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; expected one of {', '.join(SHIFTS)}")
    if n_tickets <= 0 or n_customers <= 0:
        raise ValueError(f"n_tickets and n_customers must be > 0 (got {n_tickets}, {n_customers})")
    if not 0.0 <= shift_fraction <= 1.0:
        raise ValueError(f"shift_fraction must be within [0, 1] (got {shift_fraction})")
    rng = random.Random(seed)
    customers, profiles = make_customers(rng, n_customers)
    articles = make_articles()
    # Tickets draw from their own stream, so a shift does not change the customers.
    trng = random.Random(f"{seed}-tickets-{shift}")
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
        maker = _SHIFT_MAKERS[shift] if shifted else _normal_ticket
        row = maker(trng, names[cid], snap)
        prefix = f"TCK-{shift[:4].upper()}" if shifted else "TCK"
        rows.append({"ticket_id": f"{prefix}-{i + 1:06d}", "customer_id": cid, "created_at": created,
                     **row})
    tickets = pd.DataFrame(rows)
    for col in ("intent", "priority", "article_id", "product"):
        tickets[col] = tickets[col].astype("string")
    tickets["urgency"] = tickets["urgency"].astype("Int8")
    return DemoData(tickets=tickets, customers=customers, customer_profiles=profiles, articles=articles)


def _normal_ticket(rng: random.Random, name: str, snap: dict, *, long: bool = False) -> dict:
    intent = rng.choice(INTENTS)
    product = rng.choice(list(PRODUCTS))
    # Most tickets name the product; some only use its vocabulary, which retrieval must map.
    ref = f"Tessera {product}" if rng.random() < 0.7 else rng.choice(PRODUCTS[product])
    impact = rng.choices((-1, 0, 1, 2), (0.2, 0.4, 0.25, 0.15))[0]
    tpl = TEMPLATES[intent]
    subject = rng.choice(tpl["subject"]).format(name=f"Tessera {product}")
    body = rng.choice(tpl["body"]).format(p=ref, **_details(rng))
    channel = rng.choices(CHANNELS, (0.45, 0.3, 0.2, 0.05))[0]
    text = _format(rng, channel, body, rng.choice(IMPACT[impact]), name)
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
    body = rng.choice(TEMPLATES[intent]["body"]).format(p=ref, **_details(rng))
    body += " " + rng.choice(("Key rotation fails for the HSM-backed secrets.",
                              "The vault policy editor rejects our envelope encryption rules.",
                              "Audit trails for secret access are missing since the KMS migration."))
    channel = rng.choice(CHANNELS)
    return {"channel": channel, "language": "en",
            "subject": rng.choice(TEMPLATES[intent]["subject"]).format(name=f"Tessera {product}"),
            "body": _format(rng, channel, body, rng.choice(IMPACT[impact]), name),
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
