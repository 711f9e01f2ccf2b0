"""`llmops data from-traffic`: the endpoint's triage requests that people gave feedback on,
as tables the pipeline ingests beside its data (components/traffic.py), versioned with DVC."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from components.base import StageError
from llmops.cli_common import DEFAULT_SPEC, PipelineOpt, SetOpt, SpecFile, _fail, _load, _root, data_app, out

ROUTE = "/v1/triage"
SHOWN = 5  # details printed per skip reason


@data_app.command("from-traffic")
def from_traffic(
    file: SpecFile = Path(DEFAULT_SPEC),
    pipeline: PipelineOpt = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Only requests this version answered: name/version, or name@alias (looked up in the "
                              "registry). Default: every version of the pipeline's model.")] = None,
    log: Annotated[Optional[str], typer.Option(
        "--log", help="The request log: a folder or s3://bucket/prefix/<model name> (default: monitor.log, else "
                      "where serve.request_log writes).")] = None,
    last: Annotated[Optional[int], typer.Option("--last", help="Window: the newest N triage requests.", min=1)] = None,
    hours: Annotated[Optional[float], typer.Option("--hours", help="Window: the last H hours.", min=0.001)] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder to write the tables into (default: data/traffic beside the spec).")] = None,
    append: Annotated[bool, typer.Option(
        "--append", help="Keep the rows already in the folder (a request labelled in both keeps its latest "
                         "feedback); default: replace them.")] = False,
    dvc: Annotated[bool, typer.Option("--dvc/--no-dvc", help="Version the folder with `dvc add`.")] = True,
    overrides: SetOpt = None,
) -> None:
    """Join the request log's triage requests with the feedback stored beside it (POST
    /v1/feedback; the latest per request wins) and write tickets (the corrected answers as
    labels) and their origin for `ingest.extra`, then `dvc add` the folder. Without --last
    or --hours the window is monitor.window's."""
    from components.monitor.window import read_feedback, read_window
    from components.task import AnswerSchema
    from components.traffic import TABLES, counts, join, merge
    from llmops.monitoring import log_source

    spec = _load(file, overrides, pipeline)
    name, pipe = spec.pipeline(pipeline)
    root = _root(file)
    model_name, version = _version(model, spec, root, pipe)
    source = log or log_source(spec, root, name, model_name)
    window_cfg = pipe.monitor.window
    last, hours = (last, hours) if last or hours else (window_cfg.last_requests, window_cfg.hours)
    target = (out_dir or root / "data" / "traffic").resolve()
    if dvc and not target.is_relative_to(root):
        _fail(f"--out {target} is outside the project ({root}): DVC versions files inside it (or give --no-dvc)")
    endpoint = spec.services.storage.s3_endpoint_url
    try:
        window = read_window(source, version, [ROUTE], last, hours, endpoint)
    except StageError as exc:
        _fail(str(exc), code=1)
    scope = f"{version}" if version else f"every version of {model_name}"
    size = ", ".join(p for p in (f"newest {last:,}" if last else "", f"last {hours:g} h" if hours else "") if p)
    if not window.records:
        _fail(f"no {ROUTE} requests of {scope} in {source} ({size or 'whole log'}; {window.files} log files"
              + (f"; other versions: {dict(window.other_versions)}" if window.other_versions else "") + ")", code=1)
    first, newest = window.span
    since = first[:13].replace("-", "").replace(":", "") if first else ""  # YYYYMMDDTHH of the oldest request
    try:
        feedback, corrupt = read_feedback(source, since, endpoint)
    except StageError as exc:
        _fail(str(exc), code=1)
    versions = Counter(str(r.get("model")) for r in window.records)
    out.print(f"window: {len(window.records):,} {ROUTE} requests ({', '.join(f'{k}: {v:,}' for k, v in versions.items())}"
              f"; {size or 'whole log'}; {first} .. {newest}) from {source}; {len(feedback):,} feedback records "
              "since then", highlight=False)
    for line in corrupt[:SHOWN]:
        out.print(f"skipped a corrupt feedback line: {escape(line)}", highlight=False)
    if not feedback:
        _fail(f"no feedback stored beside {source} since {first}: nothing to write (POST /v1/feedback stores "
              "corrected answers)", code=1)
    schema = AnswerSchema.of(pipe.task)
    joined = join(window, feedback, schema)
    if append and all((target / f"{t}.parquet").exists() for t in TABLES):
        joined = merge(joined, target, schema)
    out.print(f"joined: {len(joined.tickets):,} requests labelled by feedback; {joined.without_feedback:,} "
              "requests in the window without feedback", highlight=False)
    for reason, details in joined.skipped.items():
        out.print(f"skipped {len(details):,}: {reason}", highlight=False)
        for detail in details[:SHOWN]:
            out.print(f"  {escape(detail)}", highlight=False)
        if len(details) > SHOWN:
            out.print(f"  ... and {len(details) - SHOWN:,} more", highlight=False)
    if joined.tickets.empty:
        _fail("no feedback could be joined to a request in the window: nothing written", code=1)
    target.mkdir(parents=True, exist_ok=True)
    for table, frame in (("tickets", joined.tickets), ("origin", joined.origin)):
        frame.to_parquet(target / f"{table}.parquet", index=False)
    shown = target.relative_to(root) if target.is_relative_to(root) else target
    out.print(f"wrote {shown / 'tickets.parquet'}: {len(joined.tickets):,} rows ({', '.join(joined.tickets.columns)})",
              highlight=False)
    out.print(f"wrote {shown / 'origin.parquet'}: {len(joined.origin):,} rows; by the version that answered: "
              + ", ".join(f"{k} {v}" for k, v in counts(joined).items()), highlight=False)
    if dvc:
        dvc_file, md5 = _dvc_add(target, root)
        out.print(f"versioned: dvc add {shown} -> {dvc_file.relative_to(root)} (md5 {md5}); "
                  f"`git add {dvc_file.relative_to(root)}` to commit this version", highlight=False)
    out.print(escape(f"retrain on it: llmops run --set 'ingest.extra=[{shown}]'"), highlight=False)


def _version(model: str | None, spec, root: Path, pipe) -> tuple[str, str | None]:
    """(model name, ``name/version`` to keep or None for every version) from --model."""
    if model is None:
        from serving.model import ModelRef

        return (ModelRef.parse(pipe.serve.model).name if pipe.serve.model else pipe.register_.model_name), None
    from components.registry import RegistryError
    from llmops.runner import configure_environment
    from serving.model import ModelRef, find_version

    try:
        ref = ModelRef.parse(model)
    except ValueError as exc:
        _fail(f"--model {exc}")
    if ref.number is not None:
        return ref.name, f"{ref.name}/{ref.number}"
    configure_environment(spec, root)
    try:
        number, _ = find_version(ref)
    except RegistryError as exc:
        _fail(str(exc), code=1)
    return ref.name, f"{ref.name}/{number}"


def _dvc_add(folder: Path, root: Path) -> tuple[Path, str]:
    """`dvc add` the folder in the project; (its .dvc file, the hash DVC recorded)."""
    import yaml

    found = Path(sys.executable).with_name("dvc")
    tool = str(found) if found.exists() else shutil.which("dvc")
    if tool is None:
        _fail(f"the tables are written in {folder}, but dvc is not installed: install it, or give --no-dvc", code=1)
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    done = subprocess.run([tool, "add", str(folder.relative_to(root))], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    dvc_file = folder.with_name(folder.name + ".dvc")
    if done.returncode != 0 or not dvc_file.exists():
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        _fail(f"the tables are written in {folder}, but `dvc add` failed: {said[-1] if said else done.returncode}",
              code=1)
    return dvc_file, (yaml.safe_load(dvc_file.read_text())["outs"][0]).get("md5", "?")
