"""The demo generator's phrase tables: how a ticket is worded, apart from what it is about.

Two families of English phrasing: ``SEEN`` (the wording of the data a model trains on)
and ``UNSEEN`` (other templates, greetings, sign-offs and impact phrases for the same
intents and urgency levels, sharing no word 4-gram with ``SEEN`` once slot values are
masked), plus seeded typos for the unseen family (:func:`typos`). The generator writes a
share of tickets in ``UNSEEN`` wording; prepare keeps them out of training, so evaluate
can measure how a model does on phrasing it never saw. Also the Spanish and spam tables
of the generator's shifted traffic.

Slots in templates: ``{p}`` the product reference, ``{name}`` the product name (subjects),
``{n}`` a count, ``{inv}`` an invoice number, ``{code}`` an error code.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

PHRASINGS = ("seen", "unseen")  # the `phrasing` column of generated tickets (shifted traffic: the shift)


@dataclass(frozen=True)
class Phrasing:
    """One family of wording: per intent subjects and bodies; impact phrases per urgency
    level (-1..2); how each channel wraps the text."""

    subjects: dict[str, tuple[str, ...]]
    bodies: dict[str, tuple[str, ...]]
    impact: dict[int, tuple[str, ...]]
    greetings: tuple[str, ...]  # e-mail
    sign_offs: tuple[str, ...]  # e-mail, before the customer's name
    chat_openers: tuple[str, ...]
    phone_prefixes: tuple[str, ...]

    def wrap(self, rng: random.Random, channel: str, body: str, impact_text: str, name: str) -> str:
        """The ticket's text as its channel carries it."""
        if channel == "email":
            greeting = rng.choice(self.greetings)
            sign = rng.choice(self.sign_offs)
            return f"{greeting}\n\n{body} {impact_text}".rstrip() + f"\n\n{sign}\n{name}"
        if channel == "chat":
            return f"{rng.choice(self.chat_openers)} - {body} {impact_text}".rstrip()
        if channel == "phone":
            # One prefix draws nothing, so the seen wording's random stream is what it always was.
            prefix = self.phone_prefixes[0] if len(self.phone_prefixes) == 1 else rng.choice(self.phone_prefixes)
            return f"{prefix} {body} {impact_text}".rstrip()
        return f"{body} {impact_text}".rstrip()


SEEN = Phrasing(
    subjects={
        "billing_refund": ("Charged twice for {name}", "Refund request for {name}", "Wrong invoice amount"),
        "login_problem": ("Cannot log in to {name}", "Password reset not working", "Locked out of my account"),
        "bug_report": ("Error in {name}", "{name} crashes", "Something is broken in {name}"),
        "performance": ("{name} is very slow", "Timeouts in {name}", "Slow loading"),
        "feature_request": ("Feature idea for {name}", "Suggestion: {name}", "Could you add this to {name}?"),
        "integration_setup": ("Connecting {name} to Salesforce", "Help with {name} integration",
                              "Slack integration for {name}"),
        "data_export": ("Export data from {name}", "CSV export question", "Need a full backup of {name}"),
        "account_cancellation": ("Cancel our {name} subscription", "Close my account", "Cancellation request"),
    },
    bodies={
        "billing_refund": (
            "We were billed twice this month for {p}. Invoice {inv} shows the same charge two times. "
            "Please refund the duplicate.",
            "I was charged for {p} after I downgraded. Can I get a refund for invoice {inv}?",
            "The invoice {inv} for {p} has a higher amount than our plan price. Please correct it and refund "
            "the difference.",
        ),
        "login_problem": (
            "I can't sign in to {p}. The password reset e-mail never arrives and I tried {n} times.",
            "Two-factor codes are rejected when I log in to {p}. I have been locked out since this morning "
            "({n} attempts).",
            "After the SSO change I get 'invalid session' when logging into {p}, error code {code}.",
        ),
        "bug_report": (
            "{p} crashes every time I open a file larger than {n} MB. Looks like a bug.",
            "When I click save in {p} I get error {code} and my changes are lost.",
            "{p} shows the wrong numbers after the last update; totals are off by {n}.",
        ),
        "performance": (
            "{p} takes more than {n} seconds to load since yesterday.",
            "Requests to {p} time out after {n} seconds most of the afternoon.",
            "Everything in {p} is sluggish; simple pages need {n} seconds.",
        ),
        "feature_request": (
            "It would be great if {p} supported dark mode and {n} custom themes.",
            "Please add a way to schedule reports in {p}, e.g. every {n} days.",
            "We would love bulk editing in {p}; we manage {n} items by hand today.",
        ),
        "integration_setup": (
            "How do I connect {p} to our Salesforce account? The setup wizard stops at step {n}.",
            "We want {p} to post to Slack. Which permissions does the integration need? We tried {n} times.",
            "I'm setting up the Zapier integration for {p} and the OAuth redirect fails with code {code}.",
        ),
        "data_export": (
            "How can I export all our data from {p} to CSV? We have about {n} records.",
            "The export in {p} stops at {n} rows. We need the complete dataset.",
            "We need a full backup of {p} for an audit; roughly {n} files. What is the best way?",
        ),
        "account_cancellation": (
            "Please cancel our subscription to {p} at the end of the month. We have {n} seats.",
            "We decided to stop using {p}. How do I close the account and delete our data? We have {n} users.",
            "I want to cancel {p}; we moved to another tool. Our account has {n} seats.",
        ),
    },
    impact={
        -1: ("No rush on this.", "Whenever you get a chance.", "Just curious, not urgent."),
        0: ("", "Let me know what you think.", "Thanks for looking into it."),
        1: ("This is blocking my team today.", "We have a deadline this week.",
            "Several colleagues are stuck because of this."),
        2: ("Our production is down because of this!", "All of our users are affected right now.",
            "We are losing money every hour this continues."),
    },
    greetings=("Hi team,", "Hello,", "Dear support,", "Hi there,"),
    sign_offs=("Thanks,", "Best regards,", "Cheers,"),
    chat_openers=("hey", "hi", "hello"),
    phone_prefixes=("Call summary: customer reports:",),
)

# Same intents, same urgency levels, other words: a reader labels them as easily.
UNSEEN = Phrasing(
    subjects={
        "billing_refund": ("Double payment on {name}", "Overcharged by {name}", "Money back please"),
        "login_problem": ("{name} will not let me in", "Authentication trouble", "Access denied to {name}"),
        "bug_report": ("{name} misbehaving", "Fault in {name}", "{name} quits unexpectedly"),
        "performance": ("{name} lagging", "Speed issues with {name}", "Long wait times"),
        "feature_request": ("Wishlist item for {name}", "Idea to improve {name}", "Request: new option"),
        "integration_setup": ("HubSpot connector for {name}", "Teams hookup for {name}",
                              "Linking {name} with other tools"),
        "data_export": ("Downloading records from {name}", "Archive of {name} data", "Spreadsheet of our data"),
        "account_cancellation": ("Ending our {name} contract", "Terminate {name}", "Stop our plan"),
    },
    bodies={
        "billing_refund": (
            "Our card statement lists two identical payments for {p} (reference {inv}). Kindly return one "
            "of them.",
            "Since moving to a cheaper tier we still pay the old rate for {p}; bill {inv} should be credited "
            "back.",
            "Money was taken for {p} although we had removed that add-on. Could the sum on {inv} be reimbursed?",
        ),
        "login_problem": (
            "Every attempt to access {p} ends on the login screen again; {n} tries so far and still no luck.",
            "My authenticator app gives a code, but {p} says it is wrong. I am stuck outside my profile.",
            "Since yesterday {p} does not accept my credentials and shows {code} once I enter them.",
        ),
        "bug_report": (
            "{p} quits unexpectedly whenever I upload an attachment of {n} MB or more.",
            "Pressing the publish button in {p} throws {code} and nothing happens.",
            "The totals shown in {p} are incorrect since the newest release, off by exactly {n}.",
        ),
        "performance": (
            "Pages in {p} need ages to open, often {n} seconds or longer.",
            "{p} has become really laggy; even a basic search lasts {n} seconds.",
            "We keep hitting gateway timeouts in {p}, roughly {n} per hour.",
        ),
        "feature_request": (
            "Is there any plan to let {p} send a weekly summary to {n} recipients? That would help us a lot.",
            "A keyboard shortcut for archiving in {p} would save our {n} agents plenty of clicks.",
            "Could {p} get an option to pin favourite views? We switch between {n} of them daily.",
        ),
        "integration_setup": (
            "We are trying to link {p} with HubSpot, but the connector keeps failing at stage {n}.",
            "What must I configure so that {p} sends events to Microsoft Teams? It shows {code}.",
            "Linking {p} with our Salesforce sandbox fails during configuration after {n} attempts.",
        ),
        "data_export": (
            "Our auditors want a spreadsheet of everything stored in {p}, about {n} entries. How do we "
            "download it?",
            "Downloading our records from {p} as a file only gives us the first {n} lines.",
            "Is it possible to get a complete archive of what {p} holds, roughly {n} items, for safekeeping?",
        ),
        "account_cancellation": (
            "We will not renew {p} next month; please terminate the contract for our {n} licences.",
            "Kindly shut down our workspace in {p} and wipe its contents; it has {n} members.",
            "Our company is switching providers, so we are ending {p} for all {n} licences.",
        ),
    },
    impact={
        -1: ("There is no deadline on our side.", "Take your time with this one.",
             "Low importance, just wanted to flag it."),
        0: ("", "Any pointers are welcome.", "Appreciate your help."),
        1: ("Our team cannot continue work until it is fixed.", "It needs sorting out before Friday's release.",
            "A few people here are waiting on a fix."),
        2: ("Customers cannot use our service at all right now!", "Everything in production has stopped working!",
            "Every hour of this costs us revenue."),
    },
    greetings=("Good morning,", "Greetings,", "To whom it may concern,"),
    sign_offs=("Sincerely,", "Warmly,", "With appreciation,"),
    chat_openers=("yo", "quick one", "morning all"),
    phone_prefixes=("Phone note - the caller explained:", "Voicemail transcript:"),
)

TYPO_RATE = 0.06  # share of template words (4+ letters) an unseen-phrasing ticket misspells


def typos(rng: random.Random, text: str, rate: float = TYPO_RATE) -> str:
    """``text`` with some words misspelled (two letters swapped, one dropped or doubled),
    seeded by ``rng``; slots (``{p}``) and words under 4 letters are left alone, so the
    product, the numbers and the codes stay as written."""
    def misspell(match: re.Match) -> str:
        word = match.group(0)
        if rng.random() >= rate:
            return word
        i = rng.randrange(1, len(word) - 1)
        how = rng.randrange(3)
        if how == 0:
            return word[:i] + word[i + 1] + word[i] + word[i + 2:]
        return word[:i] + word[i + 1:] if how == 1 else word[:i] + word[i] + word[i:]

    return re.sub(r"(?<![{\w])[A-Za-z]{4,}(?![}\w])", misspell, text)


# Spanish versions for the `language` shift (same intents and labels).
TEMPLATES_ES: dict[str, tuple[str, ...]] = {
    "billing_refund": ("Nos cobraron dos veces por {p}. La factura {inv} muestra el mismo cargo. "
                       "Pedimos el reembolso.",),
    "login_problem": ("No puedo iniciar sesión en {p}. El correo para restablecer la contraseña no llega "
                      "({n} intentos).",),
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
