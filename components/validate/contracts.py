"""Data contracts: what each table the pipeline reads must hold, declared per column in
``validate.contracts`` and checked by Great Expectations beside the tickets' checks.

A column declares its type (values that do not parse as it fail), whether it may be null,
and, where they apply, allowed values, a range, a time window, uniqueness, a reference to
another table's column and an order against a referenced row's timestamp (a profile is not
older than its customer). A null fails every column that is not ``nullable``, so a set,
range or reference check never lets a null through. A table's ``key`` columns are never
null and unique together. Failing rows name the table, the column, the expectation, the
observed values and a few keys; with ``on_fail: quarantine`` the rows go to
``quarantine.jsonl`` with the table and reason, and tables checked later see only the rows
kept (a ticket whose customer was quarantined fails its reference).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

import pandas as pd
from pydantic import Field, model_validator

from components.base import StrictModel

Severity = Literal["error", "warn"]
ColumnType = Literal["string", "integer", "number", "timestamp", "boolean"]
# Tables checked in this order: a reference or an order rule may only point at a table before it.
ORDER = ("customers", "articles", "customer_profiles", "tickets")


class ColumnContract(StrictModel):
    type: ColumnType = "string"
    nullable: bool = False  # false: a null fails (and never passes a set/range/reference check)
    not_blank: bool = False  # strings: empty or whitespace-only fails
    values: list[str | int | float | bool] | None = None  # allowed values
    min: float | None = None  # integer/number: smallest allowed
    max: float | None = None  # integer/number: largest allowed
    not_before: datetime | None = None  # timestamp: earliest allowed
    not_after: datetime | None = None  # timestamp: latest allowed (and never after now)
    unique: bool = False
    references: str | None = Field(None, pattern=r"^[a-z_]+\.[A-Za-z_][A-Za-z0-9_]*$")  # table.column
    after: str | None = Field(None, pattern=r"^[a-z_]+\.[A-Za-z_][A-Za-z0-9_]*$")  # table.column, via references

    @model_validator(mode="after")
    def _fits_type(self) -> "ColumnContract":
        numeric, temporal = self.type in ("integer", "number"), self.type == "timestamp"
        if (self.min is not None or self.max is not None) and not numeric:
            raise ValueError(f"min/max need type integer or number (got {self.type})")
        if (self.not_before or self.not_after or self.after) and not temporal:
            raise ValueError(f"not_before/not_after/after need type timestamp (got {self.type})")
        if self.not_blank and self.type != "string":
            raise ValueError(f"not_blank needs type string (got {self.type})")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is above max ({self.max:g})")
        return self


class TableContract(StrictModel):
    enabled: bool = True  # false: the table's contract is not checked
    severity: Severity = "error"  # error: stops the run (or quarantines rows); warn: recorded
    key: list[str] = []  # columns that identify a row: never null, unique together
    extra_columns: bool = True  # false: a column the contract does not declare fails
    columns: dict[str, ColumnContract] = {}

    @model_validator(mode="after")
    def _key_declared(self) -> "TableContract":
        missing = [k for k in self.key if k not in self.columns]
        if missing:
            raise ValueError(f"key columns {missing} are not in columns")
        return self


def _c(**kw) -> ColumnContract:
    return ColumnContract(**kw)


SIGNUP = "customers.signup_at"
DEFAULTS: dict[str, TableContract] = {
    "customers": TableContract(key=["customer_id"], columns={
        "customer_id": _c(not_blank=True), "signup_at": _c(type="timestamp", not_before=datetime(2000, 1, 1,
                                                                                     tzinfo=timezone.utc))}),
    "articles": TableContract(key=["article_id"], columns={
        "article_id": _c(not_blank=True), "title": _c(not_blank=True), "body": _c(not_blank=True)}),
    "customer_profiles": TableContract(key=["customer_id", "event_timestamp"], columns={
        "customer_id": _c(references="customers.customer_id"),
        "event_timestamp": _c(type="timestamp", after=SIGNUP),
        "plan": _c(values=["free", "starter", "pro", "enterprise"]),
        "tenure_days": _c(type="integer", min=0, max=36500),
        "open_tickets_30d": _c(type="integer", min=0, max=10000),
        "seats": _c(type="integer", min=1, max=1_000_000, nullable=True)}),
    # the tickets' ids, string types and time window are their own checks (duplicates, schema, time)
    "tickets": TableContract(columns={
        "ticket_id": _c(not_blank=True), "customer_id": _c(references="customers.customer_id"),
        "created_at": _c(type="timestamp", after=SIGNUP),
        "channel": _c(values=["email", "chat", "phone", "web_form"])}),
}


class Contracts(StrictModel):
    customers: TableContract = DEFAULTS["customers"]
    articles: TableContract = DEFAULTS["articles"]
    customer_profiles: TableContract = DEFAULTS["customer_profiles"]
    tickets: TableContract = DEFAULTS["tickets"]

    @model_validator(mode="after")
    def _targets_exist(self) -> "Contracts":
        for table in ORDER:
            contract = getattr(self, table)
            for name, col in contract.columns.items():
                for rule in ("references", "after"):
                    target = getattr(col, rule)
                    if target is None:
                        continue
                    other, column = target.split(".", 1)
                    if other not in ORDER or ORDER.index(other) >= ORDER.index(table):
                        raise ValueError(f"{table}.columns.{name}.{rule}: {target!r} must name a table checked "
                                         f"before {table} ({', '.join(ORDER[:ORDER.index(table)]) or 'none'})")
                    if column not in getattr(self, other).columns:
                        raise ValueError(f"{table}.columns.{name}.{rule}: {other} declares no column {column!r}")
                if col.after and not via(contract, col.after.split(".")[0]):
                    raise ValueError(f"{table}.columns.{name}.after: {col.after!r} needs a column of {table} "
                                     f"with references: {col.after.split('.')[0]}.<key>")
        return self


def via(contract: TableContract, other: str) -> tuple[str, str] | None:
    """(this table's column, the other table's column) of the reference to ``other``."""
    for name, col in contract.columns.items():
        if col.references and col.references.split(".")[0] == other:
            return name, col.references.split(".", 1)[1]
    return None


# ---------------------------------------------------------------- checking

def parsed(series: pd.Series, kind: ColumnType) -> tuple[pd.Series, pd.Series]:
    """(values as ``kind``, whether each non-null value parses as ``kind``)."""
    present = series.notna()
    if kind == "string":
        return series, ~present | series.map(lambda v: isinstance(v, str))
    if kind == "boolean":
        return series, ~present | series.map(lambda v: isinstance(v, bool) or str(v) in ("True", "False"))
    if kind == "timestamp":
        values = pd.to_datetime(series, utc=True, errors="coerce", format="mixed")
        return values, ~present | values.notna()
    values = pd.to_numeric(series.map(lambda v: None if isinstance(v, bool) else v), errors="coerce")
    ok = values.notna()
    if kind == "integer":
        ok &= values.fillna(0) % 1 == 0
    return values, ~present | ok


def derive(frame: pd.DataFrame, contract: TableContract,
           kept: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[str, tuple[str, str]]]:
    """The table plus helper columns (``_<rule>__<column>``) the row checks look at, and what
    each helper column means: {helper: (column a person knows, rule)}."""
    df = frame.copy()
    meaning: dict[str, tuple[str, str]] = {}
    for name, col in contract.columns.items():
        if name not in df.columns:
            continue
        values, ok = parsed(df[name], col.type)
        df[f"_type__{name}"], meaning[f"_type__{name}"] = ok, (name, f"parses as {col.type}")
        if col.type in ("integer", "number", "timestamp"):
            df[f"_value__{name}"] = values.where(ok)
            meaning[f"_value__{name}"] = (name, "")
        if col.not_blank:
            df[f"_blank__{name}"] = df[name].map(lambda v: isinstance(v, str) and not v.strip())
            meaning[f"_blank__{name}"] = (name, "not empty or whitespace-only")
        if col.after:
            other, other_col = col.after.split(".", 1)
            mine, theirs = via(contract, other)
            ref = kept[other].drop_duplicates(theirs).set_index(theirs)[other_col]
            ref = pd.to_datetime(ref, utc=True, errors="coerce")
            before = df[mine].map(ref) if mine in df.columns else pd.Series(pd.NaT, index=df.index)
            before, when = pd.to_datetime(before, utc=True), values.where(ok)
            # only where both are known: a missing reference or value fails its own check
            df[f"_order__{name}"] = ~(when.notna() & before.notna() & (when < before))
            meaning[f"_order__{name}"] = (name, f"not before {col.after} of its row there")
    key = [k for k in contract.key if k in df.columns]
    if key:
        df["_key_repeated"] = df.duplicated(subset=key, keep="first") & df[key].notna().all(axis=1)
        meaning["_key_repeated"] = ("+".join(key), "unique key (repeats after the first)")
    return df, meaning


def expectations(df: pd.DataFrame, contract: TableContract, kept: dict[str, pd.DataFrame],
                 string_types: bool = True, windows: bool = True) -> tuple[list, list]:
    """(table-level, row-level) expectations as (check name, severity, expectation).
    ``string_types`` / ``windows`` false (the tickets): string types, and the nulls and
    window of timestamps, are the tickets' own schema and time checks."""
    import great_expectations.expectations as gxe

    check, sev = "contract", contract.severity
    now = pd.Timestamp.now(tz="UTC").floor("s")
    table_exps: list[tuple[str, str, Any]] = [(check, sev, gxe.ExpectColumnToExist(column=c))
                                              for c in contract.columns]
    if not contract.extra_columns:
        table_exps.append((check, sev, gxe.ExpectTableColumnsToMatchSet(
            column_set=sorted(contract.columns), exact_match=True)))
    rows: list[tuple[str, str, Any]] = []
    for name, col in contract.columns.items():
        if name not in df.columns:
            continue
        if (not col.nullable or name in contract.key) and (windows or col.type != "timestamp"):
            rows.append((check, sev, gxe.ExpectColumnValuesToNotBeNull(column=name)))
        if string_types or col.type != "string":
            rows.append((check, sev, gxe.ExpectColumnValuesToBeInSet(column=f"_type__{name}", value_set=[True])))
        if col.not_blank:
            rows.append((check, sev, gxe.ExpectColumnValuesToBeInSet(column=f"_blank__{name}", value_set=[False])))
        if col.values is not None:
            rows.append((check, sev, gxe.ExpectColumnValuesToBeInSet(column=name, value_set=list(col.values))))
        if col.min is not None or col.max is not None:
            rows.append((check, sev, gxe.ExpectColumnValuesToBeBetween(
                column=f"_value__{name}", min_value=col.min, max_value=col.max)))
        if col.type == "timestamp" and windows:
            latest = min(pd.Timestamp(col.not_after), now) if col.not_after else now
            earliest = pd.Timestamp(col.not_before) if col.not_before else None
            rows.append(("time", sev, gxe.ExpectColumnValuesToBeBetween(
                column=f"_value__{name}", min_value=earliest, max_value=latest)))
        if col.unique:
            rows.append((check, sev, gxe.ExpectColumnValuesToBeUnique(column=name)))
        if col.references:
            other, other_col = col.references.split(".", 1)
            known = sorted(kept[other][other_col].dropna().astype(str).unique()) if other_col in kept[other] else []
            rows.append(("references", sev, gxe.ExpectColumnValuesToBeInSet(column=name, value_set=known)))
        if col.after:
            rows.append(("time", sev, gxe.ExpectColumnValuesToBeInSet(column=f"_order__{name}", value_set=[True])))
    if "_key_repeated" in df.columns:
        rows.append((check, sev, gxe.ExpectColumnValuesToBeInSet(column="_key_repeated", value_set=[False])))
    return table_exps, rows


def coverage(tickets: pd.DataFrame, profiles: pd.DataFrame, max_age_days: float | None) -> pd.Series:
    """Whether each ticket has a customer profile as of its ``created_at`` (the snapshot a
    point-in-time join gives it), no older than ``max_age_days`` when set."""
    when = pd.to_datetime(tickets.get("created_at"), utc=True, errors="coerce")
    left = pd.DataFrame({"_i": range(len(tickets)), "customer_id": tickets.get("customer_id").astype(str),
                         "t": when}).dropna(subset=["t"]).sort_values("t")
    right = pd.DataFrame({"customer_id": profiles["customer_id"].astype(str),
                          "t": pd.to_datetime(profiles["event_timestamp"], utc=True, errors="coerce")})
    right = right.dropna(subset=["t"]).sort_values("t")
    right["snapshot"] = right["t"]
    joined = pd.merge_asof(left, right, on="t", by="customer_id", direction="backward")
    ok = joined["snapshot"].notna()
    if max_age_days is not None:
        ok &= (joined["t"] - joined["snapshot"]) <= pd.Timedelta(days=max_age_days)
    covered = pd.Series(True, index=range(len(tickets)))  # a missing or bad time fails the time check
    covered[joined["_i"].to_numpy()] = ok.to_numpy()
    return pd.Series(covered.to_numpy(), index=tickets.index)
