"""Splits of the examples: which split a ticket belongs to, and reading a split file.

A ticket's split is a stable function of its id and a salt (a hash), so a ticket keeps its
split when data is added or reordered; validate (the leakage check) and prepare (which
writes the splits) both use it. A held-out slice (``test_only``: column -> values, e.g.
the demo's unseen phrasing) goes to the test split whatever its hash: never trained on.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

from pydantic import Field, model_validator

from components.base import StrictModel

SPLITS = ("train", "validation", "test")


class SplitFractions(StrictModel):
    train: float = Field(0.8, gt=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitFractions":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must sum to 1 (got {total:g})")
        return self


def split_of(ticket_id: str, fractions: SplitFractions, salt: str) -> str:
    """The split a ticket belongs to: a stable function of its id (and the salt)."""
    digest = hashlib.sha256(f"{salt}:{ticket_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions.train:
        return "train"
    return "validation" if u < fractions.train + fractions.validation else "test"


def assign(ticket: Mapping, fractions: SplitFractions, salt: str,
           test_only: Mapping[str, Sequence[str]] | None = None) -> str:
    """The split of a ticket (a row with ``ticket_id``): ``test`` when one of its
    ``test_only`` columns holds a listed value, else :func:`split_of` its id."""
    for column, values in (test_only or {}).items():
        if str(ticket.get(column)) in values:
            return "test"
    return split_of(str(ticket["ticket_id"]), fractions, salt)


def read_examples(path: Path) -> list[dict]:
    """The examples of a split file written by the prepare stage (one JSON object a line)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
