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

import json
import logging
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from components.base import StageError, StageIO, StageResult, StrictModel, markdown_table, write_json
from components.generate import INTENTS, PRIORITIES
from components.ingest import SCHEMA
from components.prepare import SPLITS, PrepareSpec, split_of

TABLES = ("tickets", "customers", "customer_profiles", "articles")
OUTPUTS = tuple(f"{t}.parquet" for t in TABLES) + ("quarantine.jsonl", "validation.json", "data_docs")
Severity = Literal["error", "warn"]
STRING_COLUMNS = ("ticket_id", "customer_id", "channel", "subject", "body")
ROW = "_row"  # position of a row in the ingested table; identifies rows even when ids repeat
# Helper columns the row checks look at -> (the column(s) a person knows, the rule).
DERIVED = {
    "_body_blank": ("body", "not empty or whitespace-only"),
    "_valid_utf8": ("subject+body", "valid UTF-8"),
    "_n_tokens": ("subject+body", "length in tokens"),
    "_id_repeated": ("ticket_id", "unique (repeats after the first)"),
    "_duplicate": ("customer_id+subject+body", "not a duplicate of an earlier ticket"),
    "_leaks": ("subject+body", "not also in an earlier split"),
    "_pii": ("subject+body", "no e-mail address, phone or card number"),
}

PII_PATTERNS = {
    "EMAIL": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "CARD": re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])"),
    "PHONE": re.compile(r"(?<![\w-])\+?\(?\d{1,4}\)?(?:[ .-]?\(?\d{2,4}\)?){2,5}(?![\w-])"),
}


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
    intents: list[str] = Field(default_factory=lambda: list(INTENTS), min_length=1)
    priorities: list[str] = Field(default_factory=lambda: list(PRIORITIES), min_length=1)
    min_class_share: float = Field(0.02, ge=0, lt=1)  # each intent and priority at least this share of rows


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
    prepare_cfg = io.sections.get("prepare", PrepareSpec())
    checked = derive_columns(tickets, tables, cfg.checks, prepare_cfg, io)
    suites = build_suites(cfg.checks, tables, checked)
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
    metrics = {k: summary[k] for k in ("success", "rows_in", "rows_out", "quarantined", "pii_redacted",
                                       "failed_errors", "failed_warnings", "expectations")}
    md = (f"### validate\n{summary['expectations']} expectations on {summary['rows_in']} tickets: "
          f"{summary['failed_errors']} error(s), {summary['failed_warnings']} warning(s); "
          f"{summary['quarantined']} row(s) quarantined, {redacted} PII value(s) redacted.\n\n"
          + markdown_table([{k: r[k] for k in ("check", "severity", "column", "expectation", "observed",
                                               "threshold", "success")} for r in summary["checks"]]))
    return StageResult(outputs={n: io.out_dir / f"{n}.parquet" for n in TABLES} | {
        "quarantine": io.out_dir / "quarantine.jsonl", "report": io.out_dir / "validation.json",
        "data_docs": io.out_dir / "data_docs" / "index.html"}, metrics=metrics, summary=md)


# ---------------------------------------------------------------- derived columns

def normalise(text: pd.Series) -> pd.Series:
    """Lower case, whitespace collapsed: two tickets with equal normal forms are the same text."""
    return text.fillna("").str.lower().str.replace(r"\s+", " ", regex=True).str.strip()


def _is_pii(kind: str, candidate: str) -> bool:
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
            if any(_is_pii(kind, m.group()) for m in pattern.finditer(text))]


def redact_pii(tickets: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Replace PII in subject and body with [EMAIL], [CARD], [PHONE]; returns the count replaced."""
    count = 0

    def sub(text):
        nonlocal count
        if not isinstance(text, str):
            return text
        for kind, pattern in PII_PATTERNS.items():
            def repl(m: re.Match, kind: str = kind) -> str:
                nonlocal count
                hit = _is_pii(kind, m.group())
                count += hit
                return f"[{kind}]" if hit else m.group()
            text = pattern.sub(repl, text)
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


def derive_columns(tickets: pd.DataFrame, tables: dict[str, pd.DataFrame], checks: Checks,
                   prepare_cfg: PrepareSpec, io: StageIO) -> pd.DataFrame:
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
        df["_split"] = [split_of(str(t), prepare_cfg.split, prepare_cfg.split_salt) for t in df["ticket_id"]]
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

    from components.models import ModelError, resolve

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


# ---------------------------------------------------------------- expectations

def build_suites(checks: Checks, tables: dict[str, pd.DataFrame], checked: pd.DataFrame) -> list[dict]:
    """Suites as (name, dataframe, [(check name, severity, expectation)]) to run with GE."""
    import great_expectations.expectations as gxe

    raw_cols = [c for c in checked.columns if not c.startswith("_")]
    row_exps: list[tuple[str, str, Any]] = []
    table_exps: list[tuple[str, str, Any]] = []
    c = checks
    if c.schema_.enabled:
        required = list(SCHEMA["tickets"])
        for col in required:
            table_exps.append(("schema", c.schema_.severity, gxe.ExpectColumnToExist(column=col)))
        if not c.schema_.allow_extra_columns:
            known = sorted(set(required) | {"language", "product", "urgency"})
            table_exps.append(("schema", c.schema_.severity,
                               gxe.ExpectTableColumnsToMatchSet(column_set=known, exact_match=True)))
        for col in STRING_COLUMNS:
            if col in raw_cols:
                row_exps.append(("schema", c.schema_.severity,
                                 gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=["str"])))
    if c.text.enabled:
        for col in ("subject", "body"):
            row_exps.append(("text", c.text.severity, gxe.ExpectColumnValuesToNotBeNull(column=col)))
        row_exps.append(("text", c.text.severity, gxe.ExpectColumnValuesToBeInSet(column="_body_blank", value_set=[False])))
        row_exps.append(("text", c.text.severity, gxe.ExpectColumnValuesToBeInSet(column="_valid_utf8", value_set=[True])))
        row_exps.append(("text", c.text.severity, gxe.ExpectColumnValuesToBeBetween(
            column="_n_tokens", min_value=c.text.min_tokens, max_value=c.text.max_tokens)))
    if c.labels.enabled:
        articles = sorted(tables["articles"]["article_id"].astype(str).unique())
        for col, allowed in (("intent", c.labels.intents), ("priority", c.labels.priorities), ("article_id", articles)):
            row_exps.append(("labels", c.labels.severity, gxe.ExpectColumnValuesToNotBeNull(column=col)))
            row_exps.append(("labels", c.labels.severity, gxe.ExpectColumnValuesToBeInSet(column=col, value_set=allowed)))
    if c.duplicates.enabled:
        row_exps.append(("duplicates", c.duplicates.severity,
                         gxe.ExpectColumnValuesToBeInSet(column="_id_repeated", value_set=[False])))
        row_exps.append(("duplicates", c.duplicates.severity,
                         gxe.ExpectColumnValuesToBeInSet(column="_duplicate", value_set=[False])))
    if c.leakage.enabled:
        row_exps.append(("leakage", c.leakage.severity, gxe.ExpectColumnValuesToBeInSet(column="_leaks", value_set=[False])))
    if c.time.enabled:
        now = pd.Timestamp.now(tz="UTC").floor("s")
        latest = min(pd.Timestamp(c.time.not_after), now) if c.time.not_after else now
        row_exps.append(("time", c.time.severity, gxe.ExpectColumnValuesToNotBeNull(column="created_at")))
        row_exps.append(("time", c.time.severity, gxe.ExpectColumnValuesToBeBetween(
            column="created_at", min_value=pd.Timestamp(c.time.not_before), max_value=latest)))
    if c.references.enabled:
        customers = sorted(tables["customers"]["customer_id"].astype(str).unique())
        row_exps.append(("references", c.references.severity,
                         gxe.ExpectColumnValuesToBeInSet(column="customer_id", value_set=customers)))
    if c.pii.enabled:
        row_exps.append(("pii", c.pii.severity, gxe.ExpectColumnValuesToBeInSet(
            column="_pii", value_set=[False], mostly=round(1 - c.pii.max_share, 6))))
    # Row expectations need the columns they name; a missing column is a schema failure.
    present = set(checked.columns)
    row_exps = [e for e in row_exps if e[2].column in present]
    suites = [{"name": "tickets_table", "frame": checked[raw_cols], "exps": table_exps, "row_level": False},
              {"name": "tickets_rows", "frame": checked, "exps": row_exps, "row_level": True}]
    if c.labels.enabled and c.labels.min_class_share > 0:
        shares = []
        for col, allowed in (("intent", c.labels.intents), ("priority", c.labels.priorities)):
            counts = checked[col].value_counts() if col in present else pd.Series(dtype=int)
            shares += [{"label_column": col, "label": lab, "share": float(counts.get(lab, 0)) / max(len(checked), 1)}
                       for lab in allowed]
        suites.append({"name": "class_balance", "frame": pd.DataFrame(shares), "row_level": False,
                       "exps": [("labels", c.labels.severity, gxe.ExpectColumnValuesToBeBetween(
                           column="share", min_value=c.labels.min_class_share, max_value=1.0))]})
    return suites


def run_suites(suites: list[dict], docs_dir: Path) -> list[dict]:
    """Run each suite through a GE checkpoint that also renders Data Docs into ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    shutil.rmtree(docs_dir, ignore_errors=True)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(ctx.get_site_names()):
        ctx.delete_data_docs_site(site)  # the default site writes to a temp folder
    ctx.add_data_docs_site(site_name="validate", site_config={
        "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}})
    source = ctx.data_sources.add_pandas("llmops")
    results = []
    for suite_def in suites:
        if not suite_def["exps"]:
            continue
        batch = source.add_dataframe_asset(suite_def["name"]).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=suite_def["name"]))
        for check, severity, exp in suite_def["exps"]:
            exp.meta = {"check": check, "severity": severity}
            suite.add_expectation(exp)
        ids = [ROW, "ticket_id"] if suite_def["row_level"] else (["label"] if "label" in suite_def["frame"] else [])
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=suite_def["name"], data=batch, suite=suite))
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=suite_def["name"], validation_definitions=[vd],
            actions=[UpdateDataDocsAction(name="docs", site_names=["validate"])],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ids}))
        outcome = checkpoint.run(batch_parameters={"dataframe": suite_def["frame"]})
        for res in outcome.run_results.values():
            results.append({"suite": suite_def, "result": res})
    return results


def _report_rows(entry: dict) -> list[dict]:
    rows = []
    for r in entry["result"].results:
        cfg = r.expectation_config
        kw = cfg.kwargs
        meta = cfg.meta or {}
        res = r.result or {}
        unexpected = res.get("unexpected_index_list") or []
        row_ids = [u[ROW] for u in unexpected if isinstance(u, dict) and ROW in u]
        examples = [u.get("ticket_id", u.get("label")) for u in unexpected[:5] if isinstance(u, dict)]
        column = kw.get("column", "(table)")
        shown, rule = DERIVED.get(column, (column, ""))
        if "unexpected_count" in res:
            n = res.get("element_count") or 0
            observed = f"{res['unexpected_count']} of {n} rows ({res.get('unexpected_percent') or 0:.2f}%)"
            values = res.get("partial_unexpected_list") or []
            if values and not isinstance(values[0], (bool, type(None))) and str(values[0]) not in ("True", "False"):
                observed += f", e.g. {_short(values[:3])}"
        else:
            observed = _short(res.get("details", {}).get("mismatched") or res.get("observed_value"))
        exception = (r.exception_info or {}).get("exception_message") if isinstance(r.exception_info, dict) else None
        rows.append({
            "check": meta.get("check", "?"), "severity": meta.get("severity", "error"),
            "expectation": cfg.type + (f" ({rule})" if rule else ""), "column": shown,
            "observed": exception or observed, "threshold": "" if column.startswith("_") and column != "_n_tokens"
            else _threshold(kw),
            "success": bool(r.success), "examples": examples, "row_level": entry["suite"]["row_level"],
            "rows": row_ids if not r.success else [],
        })
    return rows


def _threshold(kw: dict) -> str:
    parts = []
    if "value_set" in kw:
        values = list(kw["value_set"])
        parts.append(f"in {_short(values[:8])}" + (f" (+{len(values) - 8} more)" if len(values) > 8 else ""))
    if kw.get("min_value") is not None or kw.get("max_value") is not None:
        parts.append(f"between {_short(kw.get('min_value'))} and {_short(kw.get('max_value'))}")
    if "type_list" in kw:
        parts.append(f"type in {kw['type_list']}")
    if "column_set" in kw:
        parts.append(f"columns exactly {kw['column_set']}")
    if kw.get("mostly") not in (None, 1, 1.0):
        parts.append(f"for at least {kw['mostly']:.2%} of rows")
    return "; ".join(parts) or "present / unique / not null"


def _short(value: Any) -> str:
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = json.dumps(value, default=str, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _write_quarantine(path: Path, rows: pd.DataFrame, reasons: dict[int, list[str]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in rows.to_dict("records"):
            row = rec.pop(ROW)
            fh.write(json.dumps({"row": row + 1, "ticket_id": rec.get("ticket_id"), "reasons": reasons[row],
                                 "record": rec}, default=str, ensure_ascii=False) + "\n")


def print_report(summary: dict) -> None:
    """The failed expectations, one line each (readable in a log as in a terminal)."""
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True, highlight=False)
    console.print(f"validate: {summary['expectations']} expectations on {summary['rows_in']} tickets, "
                  f"{summary['failed_errors']} failed (error), {summary['failed_warnings']} failed (warn); "
                  f"{summary['quarantined']} quarantined, {summary['pii_redacted']} PII value(s) redacted")
    for c in (c for c in summary["checks"] if not c["success"]):
        style = "red" if c["severity"] == "error" else "yellow"
        expected = f"; expected {c['threshold']}" if c["threshold"] else ""
        ids = f"; ids: {', '.join(map(str, c['examples']))}" if c["examples"] else ""
        console.print(f"  [{style}]{c['severity']:<5}[/] {c['check']:<10} {c['column']}: {c['expectation']}: "
                      f"{c['observed']}{expected}{ids}", markup=True)
