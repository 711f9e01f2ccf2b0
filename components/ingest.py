"""ingest: bring the raw tables into the run folder, from the demo generator or from files.

Sources (``ingest.source.kind`` in pipelines.yaml):
- ``generate``: the seeded demo generator (components/generate.py);
- ``files``: a folder, local or ``s3://bucket/prefix``, holding ``tickets``,
  ``customers``, ``customer_profiles`` and ``articles`` as ``.parquet`` or ``.jsonl``.

Either way the stage writes the four tables as Parquet with a fixed schema, so the
stages after it never care where data came from. Malformed files fail here with the
file, line and what was wrong.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Literal, Union

import pandas as pd
from pydantic import Field

from components import generate
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table
from components.reports import IngestReport
from components.tables import SCHEMA, TIME_COLUMNS

OUTPUTS = tuple(f"{t}.parquet" for t in SCHEMA)


class GenerateSource(StrictModel):
    kind: Literal["generate"] = "generate"
    n_tickets: int = Field(2000, gt=0)
    n_customers: int = Field(300, gt=0)
    seed: int = 7


class FilesSource(StrictModel):
    kind: Literal["files"] = "files"
    uri: str = Field(min_length=1)


class IngestSpec(StrictModel):
    source: Annotated[Union[GenerateSource, FilesSource], Field(discriminator="kind")] = GenerateSource()


def run(cfg: IngestSpec, io: StageIO) -> StageResult:
    """Write the four raw tables into ``io.out_dir``. Raises StageError on bad input files."""
    io.out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(cfg.source, GenerateSource):
        src = cfg.source
        data = generate.generate(n_tickets=src.n_tickets, n_customers=src.n_customers, seed=src.seed)
        tables = {name: getattr(data, name) for name in SCHEMA}
        origin = f"demo generator (seed {src.seed})"
    else:
        tables = read_tables(cfg.source.uri, io.s3_endpoint_url)
        origin = cfg.source.uri
    outputs = {}
    for name, df in tables.items():
        path = io.out_dir / f"{name}.parquet"
        df.to_parquet(path, index=False)
        outputs[name] = path
    report = IngestReport(source=origin, rows={name: int(len(df)) for name, df in tables.items()},
                          tickets_sha256=file_sha256(outputs["tickets"]))
    rows = [{"table": n, "rows": len(df), "file": str(outputs[n])} for n, df in tables.items()]
    summary = f"### ingest\nSource: `{origin}`\n\n" + markdown_table(rows)
    return StageResult(outputs=outputs, report=report, summary=summary)


def read_tables(uri: str, s3_endpoint_url: str | None = None) -> dict[str, pd.DataFrame]:
    """Read the four tables from a local folder or ``s3://bucket/prefix``."""
    if uri.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="llmops-ingest-") as tmp:
            _download_s3_prefix(uri, Path(tmp), s3_endpoint_url)
            return _read_folder(Path(tmp), label=uri.rstrip("/"))
    folder = Path(uri)
    if not folder.is_dir():
        raise StageError(f"ingest.source.uri: folder {uri} does not exist")
    return _read_folder(folder, label=str(folder))


def _download_s3_prefix(uri: str, dest: Path, endpoint_url: str | None) -> None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = uri[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    s3 = boto3.client("s3", endpoint_url=endpoint_url or None)
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        for key in keys:
            name = key[len(prefix):]
            if "/" in name or not name:
                continue  # only the folder's own files
            s3.download_file(bucket, key, str(dest / name))
    except (BotoCoreError, ClientError) as exc:
        raise StageError(f"ingest.source.uri: cannot read {uri}: {exc}") from exc
    if not keys:
        raise StageError(f"ingest.source.uri: no files under {uri}")


def _read_folder(folder: Path, label: str) -> dict[str, pd.DataFrame]:
    tables = {}
    for name, required in SCHEMA.items():
        candidates = [folder / f"{name}.parquet", folder / f"{name}.jsonl"]
        found = [p for p in candidates if p.exists()]
        if not found:
            raise StageError(f"{label}: missing table {name!r} (expected {name}.parquet or {name}.jsonl)")
        path = found[0]
        shown = f"{label}/{path.name}"
        df = _read_jsonl(path, shown) if path.suffix == ".jsonl" else _read_parquet(path, shown)
        if df.empty:
            raise StageError(f"{shown}: file has no rows")
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise StageError(f"{shown}: missing column(s) {', '.join(missing)}")
        _refuse_mixed_types(df, shown)
        if name in TIME_COLUMNS:
            col = TIME_COLUMNS[name]
            parsed = pd.to_datetime(df[col], utc=True, errors="coerce")
            bad = df.index[parsed.isna() & df[col].notna()]
            if len(bad):
                raise StageError(f"{shown}: row {bad[0] + 1}: column {col}: cannot parse "
                                 f"{df[col].iloc[bad[0]]!r} as a timestamp ({len(bad)} such rows)")
            df[col] = parsed
        tables[name] = df
    return tables


def _refuse_mixed_types(df: pd.DataFrame, shown: str) -> None:
    """A column holding both text and numbers cannot be stored or checked; say where."""
    for col in df.columns[df.dtypes == object]:
        kinds = df[col].dropna().map(lambda v: type(v).__name__)
        if kinds.nunique() > 1:
            main = kinds.mode()[0]
            odd = kinds[kinds != main].index[0]
            raise StageError(f"{shown}: row {odd + 1}: column {col}: {kinds[odd]} value {df[col][odd]!r} "
                             f"in a column of {main} values ({(kinds != main).sum()} such rows)")


def _read_parquet(path: Path, shown: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise StageError(f"{shown}: not a readable Parquet file ({exc})") from exc


def _read_jsonl(path: Path, shown: str) -> pd.DataFrame:
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise StageError(f"{shown}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StageError(f"{shown}:{lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise StageError(f"{shown}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append(obj)
    return pd.DataFrame(rows)
