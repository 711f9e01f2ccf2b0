"""Personal data in free text: e-mail addresses, phone numbers and card numbers (a card
number must pass the Luhn check), found or replaced. Validation flags or redacts them
before training; the same rules can screen logged requests."""
from __future__ import annotations

import re

import pandas as pd

PII_PATTERNS = {
    "EMAIL": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "CARD": re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"),
    "PHONE": re.compile(r"(?<![\w-])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w-])"),
}


def is_pii(kind: str, candidate: str) -> bool:
    """Whether a regex match of ``kind`` really is PII: a card number must pass the Luhn
    check; a phone number needs 9-15 digits and must not be a card number."""
    if kind == "EMAIL":
        return True
    if kind == "CARD":
        return _luhn(candidate)
    return 9 <= len(re.sub(r"\D", "", candidate)) <= 15 and not _luhn(candidate)


def find_pii(text: str) -> list[str]:
    """Kinds of PII in ``text``, in the order EMAIL, CARD, PHONE."""
    return [kind for kind, pattern in PII_PATTERNS.items()
            if any(is_pii(kind, m.group()) for m in pattern.finditer(text))]


def redact_text(text: str) -> tuple[str, int]:
    """``text`` with its PII replaced by [EMAIL], [CARD], [PHONE]; and how many were replaced."""
    count = 0
    for kind, pattern in PII_PATTERNS.items():
        def repl(m: re.Match, kind: str = kind) -> str:
            nonlocal count
            hit = is_pii(kind, m.group())
            count += hit
            return f"[{kind}]" if hit else m.group()
        text = pattern.sub(repl, text)
    return text, count


def redact_pii(tickets: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Replace PII in subject and body with [EMAIL], [CARD], [PHONE]; returns the count replaced."""
    count = 0

    def sub(text):
        nonlocal count
        if not isinstance(text, str):
            return text
        text, n = redact_text(text)
        count += n
        return text

    out = tickets.copy()
    for col in ("subject", "body"):
        if col in out:
            out[col] = out[col].map(sub)
    return out, count


def _luhn(candidate: str) -> bool:
    digits = [int(d) for d in re.sub(r"\D", "", candidate)]
    if not 13 <= len(digits) <= 19:
        return False
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(reversed(digits)))
    return total % 10 == 0
