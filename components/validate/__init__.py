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
from pydantic import Field, field_validator

from components.base import StageError, StageIO, StageResult, StrictModel, markdown_table, write_json
from components.catalog import ModelError, resolve
from components.pii import find_pii, redact_pii
from components.reports import ValidationReport
from components.splits import SPLITS, SplitFractions, assign
from components.task import TaskSpec
from components.validate.suites import ROW, _report_rows, _write_quarantine, build_suites, print_report, run_suites

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


class PiiCheck(Check):
    severity: Severity = "warn"
    max_share: float = Field(0.01, ge=0, le=1)  # flagged when more rows than this carry PII


class Checks(StrictModel):
    schema_: SchemaCheck = Field(SchemaCheck(), alias="schema")
    text: TextCheck = TextCheck()
    labels: LabelCheck = LabelCheck()
    duplicates: Check = Check()
    leakage: Check = Check()
    time: TimeCheck = TimeCheck()
    references: Check = Check()
    pii: PiiCheck = PiiCheck()

    model_config = {**StrictModel.model_config, "populate_by_name": True}


class ValidateSpec(StrictModel):
    on_fail: Literal["stop", "quarantine"] = "stop"
    pii: Literal["flag", "redact"] = "flag"
    checks: Checks = Checks()


def run(cfg: ValidateSpec, io: StageIO) -> StageResult:
    """Validate the ingested tables. Writes reports in every case; raises StageError when an
    error-level check fails and cannot be (or is not to be) handled by quarantine."""
    started = time.perf_counter()
    src = io.inputs["ingest"]
    tables = {name: pd.read_parquet(src / f"{name}.parquet") for name in TABLES}
    tickets = tables["tickets"].reset_index(drop=True)
    tickets.insert(0, ROW, range(len(tickets)))
    redacted = 0
    if cfg.pii == "redact":
        tickets, redacted = redact_pii(tickets)
    prepare_cfg = io.sections.get("prepare")
    split = (getattr(prepare_cfg, "split", SplitFractions()), getattr(prepare_cfg, "split_salt", "tessera-v1"),
             getattr(prepare_cfg, "test_only", {}))
    task: TaskSpec = io.sections.get("task", TaskSpec())
    checked = derive_columns(tickets, tables, cfg.checks, split, io)
    suites = build_suites(cfg.checks, tables, checked, task)
    results = run_suites(suites, io.out_dir / "data_docs")
    order = list(Checks.model_fields)
    report = sorted((row for r in results for row in _report_rows(r)),
                    key=lambda row: order.index(row["check"] if row["check"] != "schema" else "schema_"))

    failed_errors = [r for r in report if not r["success"] and r["severity"] == "error"]
    table_level = [r for r in failed_errors if r["row_level"] is False]
    bad_rows: dict[int, list[str]] = {}
    for r in failed_errors:
        for row in r["rows"]:
            bad_rows.setdefault(row, []).append(f"{r['check']}: {r['expectation']} on {r['column']}")
    quarantine = cfg.on_fail == "quarantine" and not table_level
    tickets = checked[list(tickets.columns)]  # with text repaired where it was not valid UTF-8
    keep = tickets[~tickets[ROW].isin(bad_rows)] if quarantine else tickets
    quarantined = tickets[tickets[ROW].isin(bad_rows)] if quarantine else tickets.iloc[0:0]

    _write_quarantine(io.out_dir / "quarantine.jsonl", quarantined, bad_rows)
    for name in TABLES:
        frame = keep.drop(columns=[ROW]) if name == "tickets" else tables[name]
        frame.to_parquet(io.out_dir / f"{name}.parquet", index=False)
    summary = {
        "success": not failed_errors,
        "on_fail": cfg.on_fail,
        "rows_in": int(len(tickets)),
        "rows_out": int(len(keep)),
        "quarantined": int(len(quarantined)),
        "pii_redacted": int(redacted),
        "failed_errors": len(failed_errors),
        "failed_warnings": sum(1 for r in report if not r["success"] and r["severity"] == "warn"),
        "expectations": len(report),
        "seconds": round(time.perf_counter() - started, 2),
        "checks": [{k: v for k, v in r.items() if k not in ("rows", "row_level")} for r in report],
    }
    write_json(io.out_dir / "validation.json", summary)
    print_report(summary)
    if failed_errors and not quarantine:
        names = ", ".join(f"{r['check']} on {r['column']}" for r in failed_errors)
        why = " (table-level checks cannot be quarantined)" if cfg.on_fail == "quarantine" else ""
        raise StageError(f"validation failed{why}: {len(failed_errors)} error-level expectation(s): {names}; "
                         "details in validation.json and data_docs/index.html")
    report = ValidationReport(**{k: summary[k] for k in ValidationReport.model_fields})
    md = (f"### validate\n{summary['expectations']} expectations on {summary['rows_in']} tickets: "
          f"{summary['failed_errors']} error(s), {summary['failed_warnings']} warning(s); "
          f"{summary['quarantined']} row(s) quarantined, {redacted} PII value(s) redacted.\n\n"
          + markdown_table([{k: r[k] for k in ("check", "severity", "column", "expectation", "observed",
                                               "threshold", "success")} for r in summary["checks"]]))
    return StageResult(outputs={n: io.out_dir / f"{n}.parquet" for n in TABLES} | {
        "quarantine": io.out_dir / "quarantine.jsonl", "report": io.out_dir / "validation.json",
        "data_docs": io.out_dir / "data_docs" / "index.html"}, report=report, summary=md)


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
    subject = df["subject"] if "subject" in has else pd.Series([None] * len(df))
    body = df["body"] if "body" in has else pd.Series([None] * len(df))
    text = subject.fillna("").astype(str) + "\n" + body.fillna("").astype(str)
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
    df["_pii"] = text.map(lambda t: bool(find_pii(t)))
    return df


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


