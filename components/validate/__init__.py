"""validate: Great Expectations checks on the ingested tables, before anything is trained.

The checks and their thresholds are declared in pipelines.yaml, each with a severity:
``error`` stops the run, ``warn`` is recorded and the run goes on. With
``on_fail: quarantine`` rows that fail an error-level row check are set aside in
``quarantine.jsonl`` with their reasons, and the run continues on the rest; checks about
the whole table (columns, class balance) cannot be fixed by dropping rows, so they stop
the run either way. ``pii: redact`` replaces e-mail addresses, phone numbers and card
numbers with placeholders before checking.

Outputs: the validated tables (what ``prepare`` reads), ``quarantine.jsonl``,
``validation.json`` (every expectation: observed value, threshold, offending ticket ids),
and Great Expectations Data Docs under ``data_docs/``.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Literal

import pandas as pd
from pydantic import Field, field_validator, model_validator

from components.base import StageError, StageIO, StageResult, StrictModel, markdown_table, write_json
from components.catalog import ModelError, resolve
from components.pii import find_pii, redact_pii
from components.reports import ValidationReport
from components.splits import SPLITS, SplitFractions, assign
from components.task import TaskSpec
from components.validate import leakage
from components.validate.contracts import ORDER, Contracts, coverage, derive, expectations
from components.validate.leakage import NearDuplicates
from components.validate.suites import (ROW, _report_rows, _write_quarantine, build_suites, docs_context, print_report,
                                        run_suites, where)

__all__ = ["ROW", "Checks", "ValidateSpec", "build_suites", "derive_columns", "find_pii", "redact_pii", "run",
           "run_suites", "_report_rows"]

TABLES = ("tickets", "customers", "customer_profiles", "articles")
OUTPUTS = tuple(f"{t}.parquet" for t in TABLES) + ("quarantine.jsonl", "validation.json", "data_docs")
Severity = Literal["error", "warn"]
class Check(StrictModel):
    enabled: bool = True  # false: the check is not run at all
    severity: Severity = "error"  # error: stops the run (or quarantines rows); warn: recorded only


class SchemaCheck(Check):
    allow_extra_columns: bool = True  # false: columns beyond the known ones fail the check


class TextCheck(Check):
    tokenizer: str = "smollm2-135m-instruct"  # a model reference: its tokenizer counts the tokens
    min_tokens: int = Field(5, ge=0)  # subject + body, in tokens of that tokenizer
    max_tokens: int = Field(512, gt=0)  # the context budget left for the ticket

    @field_validator("max_tokens")
    @classmethod
    def _above_min(cls, value: int, info) -> int:
        if value < info.data.get("min_tokens", 0):
            raise ValueError(f"must be >= min_tokens ({info.data['min_tokens']}) (got {value})")
        return value


class LabelCheck(Check):
    # The allowed values are the task's (task.answer); each listed value of a field with a list
    # (not a table-bound one) must be at least this share of the rows.
    min_class_share: float = Field(0.02, ge=0, lt=1)


class TimeCheck(Check):
    not_before: datetime = datetime(2020, 1, 1, tzinfo=timezone.utc)  # earliest accepted created_at
    not_after: datetime | None = None  # latest accepted created_at; None: now (never in the future)


class CoverageCheck(Check):
    # A ticket needs a customer profile as of its created_at (what prepare's point-in-time
    # join gives it), at most this old (the feature view's ttl); null: any age.
    max_age_days: float | None = Field(365, gt=0)


class PiiCheck(Check):
    severity: Severity = "warn"
    max_share: float = Field(0.01, ge=0, le=1)  # flagged when more rows than this carry PII


class LeakageCheck(Check):
    near_duplicates: NearDuplicates = NearDuplicates()  # near copies in train (components/validate/leakage.py)


class Checks(StrictModel):
    schema_: SchemaCheck = Field(SchemaCheck(), alias="schema")
    text: TextCheck = TextCheck()
    labels: LabelCheck = LabelCheck()
    duplicates: Check = Check()
    leakage: LeakageCheck = LeakageCheck()
    time: TimeCheck = TimeCheck()
    coverage: CoverageCheck = CoverageCheck()
    pii: PiiCheck = PiiCheck()

    model_config = {**StrictModel.model_config, "populate_by_name": True}

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "references" in data:
            raise ValueError("checks.references moved into the tickets' contract: remove it (the default "
                             "validate.contracts.tickets.columns.customer_id has references: customers.customer_id)")
        return data


class ValidateSpec(StrictModel):
    on_fail: Literal["stop", "quarantine"] = "stop"
    pii: Literal["flag", "redact"] = "flag"
    checks: Checks = Checks()
    contracts: Contracts = Contracts()


def run(cfg: ValidateSpec, io: StageIO) -> StageResult:
    """Validate the ingested tables. Writes reports in every case; raises StageError when an
    error-level check fails and cannot be (or is not to be) handled by quarantine."""
    started = time.perf_counter()
    src = io.inputs["ingest"]
    tables = {name: _numbered(pd.read_parquet(src / f"{name}.parquet")) for name in TABLES}
    ctx = docs_context(io.out_dir / "data_docs")
    report: list[dict] = []
    quarantined: dict[str, tuple[pd.DataFrame, dict[int, list[str]]]] = {}
    kept: dict[str, pd.DataFrame] = {}
    can_quarantine = cfg.on_fail == "quarantine"
    for name in ORDER[:-1]:  # the tickets last: their references and coverage see the rows kept
        contract, frame = getattr(cfg.contracts, name), tables[name]
        if not contract.enabled:
            kept[name] = frame
            continue
        df, meaning = derive(frame, contract, kept)
        table_exps, row_exps = expectations(df, contract, kept)
        rows = _rows(run_suites(_suites(name, frame, df, table_exps, row_exps, meaning, contract.key),
                                io.out_dir / "data_docs", ctx, docs=False))
        report += rows
        can_quarantine &= not _table_level(rows)
        kept[name], quarantined[name] = _split(frame, rows, can_quarantine)

    tickets = tables["tickets"]
    redacted = 0
    if cfg.pii == "redact":
        tickets, redacted = redact_pii(tickets)
    prepare_cfg = io.sections.get("prepare")
    split = (getattr(prepare_cfg, "split", SplitFractions()), getattr(prepare_cfg, "split_salt", "tessera-v1"),
             getattr(prepare_cfg, "test_only", {}))
    task: TaskSpec = io.sections.get("task", TaskSpec())
    checked = derive_columns(tickets, kept, cfg.checks, split, io)
    suites = build_suites(cfg.checks, kept, checked, task)
    if cfg.contracts.tickets.enabled:
        contract = cfg.contracts.tickets
        checked, meaning = derive(checked, contract, kept)
        table_exps, row_exps = expectations(checked, contract, kept, string_types=False, windows=False)
        suites[0]["exps"] += table_exps
        suites[1] |= {"frame": checked, "meaning": meaning,
                      "exps": suites[1]["exps"] + [e for e in row_exps if e[2].column in checked]}
    rows = _rows(run_suites(suites, io.out_dir / "data_docs", ctx, docs=False))
    ctx.build_data_docs(site_names=["validate"])  # once for every suite: ~1 s per suite rendered
    report += rows
    can_quarantine &= not _table_level(rows)
    tickets = checked[list(tickets.columns)]  # with text repaired where it was not valid UTF-8
    keep, quarantined["tickets"] = _split(tickets, rows, can_quarantine)

    failed_errors = [r for r in report if not r["success"] and r["severity"] == "error"]
    quarantine = can_quarantine  # on_fail: quarantine, and no table-level failure anywhere
    near_cfg = cfg.checks.leakage.near_duplicates
    near_failed = any(not r["success"] and r["column"] == leakage.SHOWN for r in report)
    near_rows = leakage.quarantine_rows(checked, near_cfg, near_failed, ROW)
    if near_rows:  # its own action: quarantined whatever on_fail says
        gone, reasons = quarantined["tickets"]
        for row, why in near_rows.items():
            reasons.setdefault(row, []).append(why)
        moved = keep[ROW].isin(near_rows)
        quarantined["tickets"] = (pd.concat([gone, keep[moved]]), reasons)
        keep = keep[~moved]
    _write_quarantine(io.out_dir / "quarantine.jsonl", quarantined)
    for name in TABLES:
        frame = keep if name == "tickets" else kept[name]  # kept: every row unless quarantined
        frame.drop(columns=[ROW]).to_parquet(io.out_dir / f"{name}.parquet", index=False)
    n_quarantined = {n: int(len(q[0])) for n, q in quarantined.items() if len(q[0])}
    summary = {
        "success": not failed_errors,
        "on_fail": cfg.on_fail,
        "rows_in": int(len(tickets)),
        "rows_out": int(len(keep)),
        "quarantined": n_quarantined.get("tickets", 0),
        "quarantined_by_table": n_quarantined,
        "pii_redacted": int(redacted),
        "failed_errors": len(failed_errors),
        "failed_warnings": sum(1 for r in report if not r["success"] and r["severity"] == "warn"),
        "expectations": len(report),
        "seconds": round(time.perf_counter() - started, 2),
        "checks": [{k: v for k, v in r.items() if k not in ("rows", "row_level")} for r in report],
        "near_duplicates": None,
    }
    if "_near_duplicate" in checked:
        near = leakage.summarise(checked, _text(checked), near_cfg, near_failed, len(near_rows))
        summary["near_duplicates"] = near.model_dump(mode="json")
    write_json(io.out_dir / "validation.json", summary)
    print_report(summary)
    if summary["near_duplicates"]:
        leakage.print_summary(near)
    if failed_errors and not quarantine:
        names = ", ".join(f"{r['check']} on {where(r)}" for r in failed_errors)
        why = " (table-level checks cannot be quarantined)" if cfg.on_fail == "quarantine" else ""
        raise StageError(f"validation failed{why}: {len(failed_errors)} error-level expectation(s): {names}; "
                         "details in validation.json and data_docs/index.html")
    report = ValidationReport(**{k: summary[k] for k in ValidationReport.model_fields})
    md = (f"### validate\n{summary['expectations']} expectations on {summary['rows_in']} tickets: "
          f"{summary['failed_errors']} error(s), {summary['failed_warnings']} warning(s); "
          f"{summary['quarantined']} row(s) quarantined, {redacted} PII value(s) redacted.\n\n"
          + markdown_table([{"check": r["check"], "severity": r["severity"], "column": where(r)}
                            | {k: r[k] for k in ("expectation", "observed", "threshold", "success")}
                            for r in summary["checks"]]))
    return StageResult(outputs={n: io.out_dir / f"{n}.parquet" for n in TABLES} | {
        "quarantine": io.out_dir / "quarantine.jsonl", "report": io.out_dir / "validation.json",
        "data_docs": io.out_dir / "data_docs" / "index.html"}, report=report, summary=md)


def _numbered(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reset_index(drop=True)
    frame.insert(0, ROW, range(len(frame)))
    return frame


def _suites(table: str, frame, checked, table_exps, row_exps, meaning, key) -> list[dict]:
    present = set(checked.columns)
    return [{"name": f"{table}_table", "frame": frame.drop(columns=[ROW]), "exps": table_exps,
             "row_level": False, "table": table},
            {"name": f"{table}_rows", "frame": checked, "exps": [e for e in row_exps if e[2].column in present],
             "row_level": True, "table": table, "meaning": meaning, "ids": [ROW, *key]}]


def _rows(results: list[dict]) -> list[dict]:
    order = ["schema" if n == "schema_" else n for n in Checks.model_fields] + ["contract", "references"]
    return sorted((row for r in results for row in _report_rows(r)), key=lambda row: order.index(row["check"]))


def _table_level(rows: list[dict]) -> bool:
    return any(not r["success"] and r["severity"] == "error" and not r["row_level"] for r in rows)


def _split(frame: pd.DataFrame, rows: list[dict], quarantine: bool):
    """(rows kept, (rows quarantined, reasons per row)) of one table."""
    reasons: dict[int, list[str]] = {}
    for r in rows:
        if not r["success"] and r["severity"] == "error":
            for row in r["rows"]:
                reasons.setdefault(row, []).append(f"{r['check']}: {r['expectation']} on {r['column']}")
    if not quarantine:
        return frame, (frame.iloc[0:0], {})
    bad = frame[ROW].isin(reasons)
    return frame[~bad], (frame[bad], reasons)


# ---------------------------------------------------------------- derived columns

def normalise(text: pd.Series) -> pd.Series:
    """Lower case, whitespace collapsed: two tickets with equal normal forms are the same text."""
    return text.fillna("").str.lower().str.replace(r"\s+", " ", regex=True).str.strip()


def derive_columns(tickets: pd.DataFrame, tables: dict[str, pd.DataFrame], checks: Checks,
                   split: tuple[SplitFractions, str, dict], io: StageIO) -> pd.DataFrame:
    """The tickets plus the helper columns row checks look at (all prefixed ``_``)."""
    df = tickets.copy()
    has = set(df.columns)
    valid = pd.Series(True, index=df.index)
    for col in ("subject", "body"):
        if col in has:
            ok = df[col].map(lambda v: not isinstance(v, str) or _is_utf8(v))
            valid &= ok
            # Nothing downstream (tokenizer, GE, Parquet) takes lone surrogates: repair them,
            # and let the flag carry the finding.
            df[col] = df[col].where(ok, df[col].map(_repair_utf8))
    df["_valid_utf8"] = valid
    text = _text(df)
    body = df["body"] if "body" in has else pd.Series([None] * len(df))
    df["_body_blank"] = body.map(lambda b: not isinstance(b, str) or not b.strip())
    if checks.text.enabled:
        df["_n_tokens"] = count_tokens(text.tolist(), checks.text.tokenizer, io)
    norm = normalise(text)
    if "ticket_id" in has:
        df["_id_repeated"] = df["ticket_id"].duplicated(keep="first")
    if "customer_id" in has:
        df["_duplicate"] = (df["customer_id"].astype(str) + "\x00" + norm).duplicated(keep="first")
    if "ticket_id" in has:
        df["_split"] = [assign(r, *split) for r in df.to_dict("records")]
        order = df["_split"].map(SPLITS.index)
        first_split = order.groupby(norm).transform("min")
        df["_leaks"] = order > first_split  # same text already in an earlier split (train < validation < test)
        if checks.leakage.enabled and checks.leakage.near_duplicates.enabled:
            leakage.add_columns(df, text, checks.leakage.near_duplicates, tables.get("customers"))
    df["_pii"] = text.map(lambda t: bool(find_pii(t)))
    if checks.coverage.enabled and {"customer_id", "created_at"} <= has:
        df["_profile_as_of"] = coverage(df, tables["customer_profiles"], checks.coverage.max_age_days)
    return df


def _text(df: pd.DataFrame) -> pd.Series:
    """Subject and body, one text per ticket (what the text checks look at)."""
    parts = [df[c].fillna("").astype(str) if c in df else pd.Series([""] * len(df), index=df.index)
             for c in ("subject", "body")]
    return parts[0] + "\n" + parts[1]


def _repair_utf8(value):
    return value.encode("utf-8", "replace").decode("utf-8") if isinstance(value, str) else value


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates from a bad decode
        return False


def count_tokens(texts: list[str], tokenizer_ref: str, io: StageIO) -> list[int]:
    """Token counts of ``texts`` (no special tokens) with the referenced model's tokenizer."""
    from transformers import AutoTokenizer

    try:
        path = resolve(tokenizer_ref, io.models, io.state_dir)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (ModelError, OSError) as exc:
        raise StageError(f"validate.checks.text.tokenizer: cannot load {tokenizer_ref!r}: {exc}") from exc
    counts: list[int] = []
    for i in range(0, len(texts), 4096):
        enc = tokenizer(texts[i:i + 4096], add_special_tokens=False, return_attention_mask=False)
        counts += [len(ids) for ids in enc["input_ids"]]
    return counts


