"""The Great Expectations side of validation: suites built from the checks, run through a
checkpoint that renders Data Docs, and their results as report rows."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from components.tables import SCHEMA
from components.task import TaskSpec, resolve_values
from components.validate import leakage

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
    "_near_duplicate": (leakage.SHOWN, "no near copy in the training split"),
    "_pii": ("subject+body", "no e-mail address, phone or card number"),
    "_profile_as_of": ("customer_id+created_at", "a customer profile as of the ticket's time"),
}


def build_suites(checks, tables: dict[str, pd.DataFrame], checked: pd.DataFrame,
                 task: TaskSpec | None = None) -> list[dict]:
    """Suites as (name, dataframe, [(check name, severity, expectation)]) to run with GE."""
    import great_expectations.expectations as gxe

    raw_cols = [c for c in checked.columns if not c.startswith("_")]
    row_exps: list[tuple[str, str, Any]] = []
    table_exps: list[tuple[str, str, Any]] = []
    c = checks
    task = task or TaskSpec()
    allowed = resolve_values(task, tables) if c.labels.enabled else {}
    if c.schema_.enabled:
        required = list(dict.fromkeys([*SCHEMA["tickets"], *task.answer]))
        for col in required:
            table_exps.append(("schema", c.schema_.severity, gxe.ExpectColumnToExist(column=col)))
        if not c.schema_.allow_extra_columns:
            known = sorted(set(required) | {"language", "product", "urgency", "phrasing"})  # the demo's annotations
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
        for col, values in allowed.items():
            row_exps.append(("labels", c.labels.severity, gxe.ExpectColumnValuesToNotBeNull(column=col)))
            row_exps.append(("labels", c.labels.severity, gxe.ExpectColumnValuesToBeInSet(column=col, value_set=values)))
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
    if c.coverage.enabled:
        row_exps.append(("coverage", c.coverage.severity,
                         gxe.ExpectColumnValuesToBeInSet(column="_profile_as_of", value_set=[True])))
    if c.pii.enabled:
        row_exps.append(("pii", c.pii.severity, gxe.ExpectColumnValuesToBeInSet(
            column="_pii", value_set=[False], mostly=round(1 - c.pii.max_share, 6))))
    # Row expectations need the columns they name; a missing column is a schema failure.
    present = set(checked.columns)
    row_exps = [e for e in row_exps if e[2].column in present]
    suites = [{"name": "tickets_table", "frame": checked[raw_cols], "exps": table_exps, "row_level": False},
              {"name": "tickets_rows", "frame": checked, "exps": row_exps, "row_level": True}]
    near = c.leakage.near_duplicates
    if c.leakage.enabled and near.enabled and "_near_duplicate" in present:
        # Its own suite: the share is of validation and test rows, not of all tickets.
        suites.append({"name": "near_duplicates", "frame": leakage.evaluated(checked), "row_level": True,
                       "exps": [("leakage", near.severity, gxe.ExpectColumnValuesToBeInSet(
                           column="_near_duplicate", value_set=[False], mostly=round(1 - near.max_share, 6)))]})
    if c.labels.enabled and c.labels.min_class_share > 0:
        shares = []
        for col, field in task.answer.items():
            if field.values is None:
                continue  # table-bound values (e.g. one article each): no share to expect
            counts = checked[col].value_counts() if col in present else pd.Series(dtype=int)
            shares += [{"label_column": col, "label": lab, "share": float(counts.get(lab, 0)) / max(len(checked), 1)}
                       for lab in field.values]
        suites.append({"name": "class_balance", "frame": pd.DataFrame(shares), "row_level": False,
                       "exps": [("labels", c.labels.severity, gxe.ExpectColumnValuesToBeBetween(
                           column="share", min_value=c.labels.min_class_share, max_value=1.0))]})
    return suites


def docs_context(docs_dir: Path):
    """An ephemeral GE context whose Data Docs site is ``docs_dir`` (emptied first)."""
    import great_expectations as gx
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
    ctx.data_sources.add_pandas("llmops")
    return ctx


def run_suites(suites: list[dict], docs_dir: Path, ctx=None, docs: bool = True) -> list[dict]:
    """Run each suite through a GE checkpoint that also renders Data Docs into ``docs_dir``
    (through ``ctx`` when given: one site for several calls; ``docs`` false: rendered later,
    once, by ``ctx.build_data_docs()``, which costs what one rendering per suite would)."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    ctx = ctx or docs_context(docs_dir)
    source = ctx.data_sources.get("llmops")
    results = []
    for suite_def in suites:
        if not suite_def["exps"]:
            continue
        batch = source.add_dataframe_asset(suite_def["name"]).add_batch_definition_whole_dataframe("all")
        suite = ctx.suites.add(gx.ExpectationSuite(name=suite_def["name"]))
        for check, severity, exp in suite_def["exps"]:
            exp.meta = {"check": check, "severity": severity}
            suite.add_expectation(exp)
        ids = suite_def.get("ids", [ROW, "ticket_id"]) if suite_def["row_level"] else (
            ["label"] if "label" in suite_def["frame"] else [])
        ids = [i for i in ids if i in suite_def["frame"]]
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=suite_def["name"], data=batch, suite=suite))
        checkpoint = ctx.checkpoints.add(gx.Checkpoint(
            name=suite_def["name"], validation_definitions=[vd],
            actions=[UpdateDataDocsAction(name="docs", site_names=["validate"])] if docs else [],
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
        suite = entry["suite"]
        named = [i for i in suite.get("ids", [ROW, "ticket_id", "label"]) if i != ROW] or ["label"]
        examples = ["/".join(str(u[i]) for i in named if i in u) for u in unexpected[:5] if isinstance(u, dict)]
        column = kw.get("column", "(table)")
        shown, rule = {**DERIVED, **suite.get("meaning", {})}.get(column, (column, ""))
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
            "table": suite.get("table", "tickets"), "check": meta.get("check", "?"), "severity": meta.get("severity", "error"),
            "expectation": cfg.type + (f" ({rule})" if rule else ""), "column": shown,
            "observed": exception or observed,
            "threshold": _threshold(kw) if not column.startswith("_") or "min_value" in kw else "",
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


def _write_quarantine(path: Path, quarantined: dict[str, tuple[pd.DataFrame, dict[int, list[str]]]]) -> None:
    """One line per quarantined row: its table, row number (1-based), id, reasons, record."""
    with open(path, "w", encoding="utf-8") as fh:
        for table, (rows, reasons) in quarantined.items():
            for rec in rows.to_dict("records"):
                row = rec.pop(ROW)
                key = {k: rec[k] for k in ("ticket_id", "customer_id", "article_id") if k in rec}
                key = {"ticket_id": rec.get("ticket_id")} if table == "tickets" else key
                fh.write(json.dumps({"table": table, "row": row + 1, **key, "reasons": reasons[row], "record": rec},
                                    default=str, ensure_ascii=False) + "\n")


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
        console.print(f"  [{style}]{c['severity']:<5}[/] {c['check']:<10} {where(c)}: {c['expectation']}: "
                      f"{c['observed']}{expected}{ids}", markup=True)


def where(row: dict) -> str:
    """The column a report row is about; ``table.column`` outside the tickets table."""
    return row["column"] if row.get("table", "tickets") == "tickets" else f"{row['table']}.{row['column']}"
