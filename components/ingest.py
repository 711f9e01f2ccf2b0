"""ingest: bring the raw tables into the run folder, from the demo generator or from files.

Sources (``ingest.source.kind`` in pipelines.yaml):
- ``generate``: the seeded demo generator (components/generate.py), ``unseen_share`` of
  its tickets worded in a phrasing no other ticket uses (prepare keeps them for testing);
- ``files``: a folder, local or ``s3://bucket/prefix``, holding ``tickets``,
  ``customers``, ``customer_profiles`` and ``articles`` as ``.parquet`` or ``.jsonl``.

``extra``: more folders (local or ``s3://``) whose tables are added beside the source's,
e.g. the labelled traffic `llmops data from-traffic` writes (``data/traffic``): each holds
one or more of the four tables, appended to the source's table of the same name. The report
counts the tickets of each origin and records each extra folder's files by SHA-256 (and the
folder's DVC hash when a ``.dvc`` file beside it versions it); the stage's MLflow run and
the pipeline's run are tagged with them, and each extra tickets file is a dataset input.

Either way the stage writes the four tables as Parquet with a fixed schema, so the
stages after it never care where data came from. Malformed files fail here with the
file, line and what was wrong.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal, Union

import pandas as pd
from pydantic import Field, field_validator

from components import generate, tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table
from components.reports import IngestOrigin, IngestReport
from components.tables import SCHEMA, TIME_COLUMNS

OUTPUTS = tuple(f"{t}.parquet" for t in SCHEMA)


class GenerateSource(StrictModel):
    kind: Literal["generate"] = "generate"
    n_tickets: int = Field(2000, gt=0)
    n_customers: int = Field(300, gt=0)
    seed: int = 7
    unseen_share: float = Field(0.05, ge=0, le=1)  # tickets worded unlike any other (column phrasing)


class FilesSource(StrictModel):
    kind: Literal["files"] = "files"
    uri: str = Field(min_length=1)


class IngestSpec(StrictModel):
    source: Annotated[Union[GenerateSource, FilesSource], Field(discriminator="kind")] = GenerateSource()
    extra: list[str] = []  # folders (relative to the spec's folder) or s3:// prefixes added beside the source

    @field_validator("extra")
    @classmethod
    def _distinct(cls, extra: list[str]) -> list[str]:
        if any(not e.strip() for e in extra):
            raise ValueError("an entry is empty; give a folder or an s3:// prefix")
        twice = sorted({e for e in extra if extra.count(e) > 1})
        if twice:
            raise ValueError(f"listed twice: {', '.join(twice)} (its rows would be added twice)")
        return extra

    def local_extra(self) -> list[str]:
        """The extra folders on disk (what DVC tracks as the stage's data deps)."""
        return [e.rstrip("/") for e in self.extra if not e.startswith("s3://")]


def run(cfg: IngestSpec, io: StageIO) -> StageResult:
    """Write the four raw tables into ``io.out_dir``. Raises StageError on bad input files."""
    io.out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(cfg.source, GenerateSource):
        src = cfg.source
        data = generate.generate(n_tickets=src.n_tickets, n_customers=src.n_customers, seed=src.seed,
                                 unseen_share=src.unseen_share)
        tables = {name: getattr(data, name) for name in SCHEMA}
        source = f"demo generator (seed {src.seed})"
    else:
        tables = read_tables(cfg.source.uri, io.s3_endpoint_url)
        source = cfg.source.uri
    by_origin = {"source": int(len(tables["tickets"]))}
    origins = []
    for uri in cfg.extra:
        added, origin = read_extra(uri, io)
        for name, df in added.items():
            tables[name] = pd.concat([tables[name], df], ignore_index=True)
        by_origin[_metric_name(uri)] = origin.rows.get("tickets", 0)
        origins.append(origin)
    outputs = {}
    for name, df in tables.items():
        path = io.out_dir / f"{name}.parquet"
        df.to_parquet(path, index=False)
        outputs[name] = path
    report = IngestReport(source=source, rows={name: int(len(df)) for name, df in tables.items()},
                          tickets_sha256=file_sha256(outputs["tickets"]), tickets_by_origin=by_origin,
                          extra=origins)
    rows = [{"table": n, "rows": len(df), "file": str(outputs[n])} for n, df in tables.items()]
    summary = f"### ingest\nSource: `{source}`\n\n" + markdown_table(rows)
    if origins:
        _track(origins, io)
        summary += "\n\nAdded beside the source:\n\n" + markdown_table(
            [{"from": o.uri, "rows": ", ".join(f"{t} {n}" for t, n in o.rows.items()),
              "version": f"dvc md5 {o.dvc_md5}" if o.dvc_md5 else f"sha256 {o.sha256['tickets'][:12]}..."
              if "tickets" in o.sha256 else "-"} for o in origins])
    return StageResult(outputs=outputs, report=report, summary=summary)


def read_extra(uri: str, io: StageIO) -> tuple[dict[str, pd.DataFrame], IngestOrigin]:
    """The tables of one ``ingest.extra`` entry and where they came from (their files'
    SHA-256, the DVC hash of a local folder a ``.dvc`` file versions)."""
    label = f"ingest.extra: {uri}"
    if uri.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="llmops-ingest-") as tmp:
            _download_s3_prefix(uri, Path(tmp), io.s3_endpoint_url)
            tables, hashes = _read_folder(Path(tmp), label=uri.rstrip("/"), optional=True)
        return tables, IngestOrigin(uri=uri, rows={n: len(t) for n, t in tables.items()}, sha256=hashes)
    folder = Path(uri) if Path(uri).is_absolute() else io.root / uri
    if not folder.is_dir():
        raise StageError(f"{label}: folder {folder} does not exist (`llmops data from-traffic` writes "
                         "data/traffic)")
    tables, hashes = _read_folder(folder, label=str(folder), optional=True)
    origin = IngestOrigin(uri=uri, rows={n: len(t) for n, t in tables.items()}, sha256=hashes,
                          dvc_md5=_dvc_md5(folder.with_name(folder.name + ".dvc")))
    if (folder / "origin.parquet").exists():  # labelled traffic: rows per version that answered
        models = pd.read_parquet(folder / "origin.parquet", columns=["model"]).model.astype(str)
        origin = origin.model_copy(update={"models": {k: int(v) for k, v in models.value_counts().items()}})
    return tables, origin


def _dvc_md5(path: Path) -> str | None:
    """The hash a ``.dvc`` file records for its output (a folder's ends in ``.dir``)."""
    import yaml

    if not path.is_file():
        return None
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def _metric_name(uri: str) -> str:
    """An MLflow-safe name for an origin (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", uri.rstrip("/"))


def _track(origins: list[IngestOrigin], io: StageIO) -> None:
    """Say in the stage's and the pipeline's MLflow runs what was added beside the source."""
    said = "; ".join(f"{o.uri}: {o.rows.get('tickets', 0)} tickets"
                     + (f" (dvc md5 {o.dvc_md5})" if o.dvc_md5 else "") for o in origins)
    tags = {"llmops.ingest.extra": said,
            "llmops.ingest.extra_tickets": sum(o.rows.get("tickets", 0) for o in origins)}
    tracking.set_tags(tags)
    parent = io.context.get("mlflow_parent_run_id")
    if parent and tracking.active():
        import mlflow

        for key, value in tags.items():
            mlflow.MlflowClient().set_tag(parent, key, str(value))
    for o in origins:
        if "tickets" in o.sha256 and not o.uri.startswith("s3://"):
            path = Path(o.uri) if Path(o.uri).is_absolute() else io.root / o.uri
            found = [p for p in (path / "tickets.parquet", path / "tickets.jsonl") if p.exists()]
            tracking.log_dataset(found[0], o.sha256["tickets"], f"{io.pipeline}-extra-{_metric_name(o.uri)}",
                                 "ingest", rows=o.rows["tickets"])


def read_tables(uri: str, s3_endpoint_url: str | None = None) -> dict[str, pd.DataFrame]:
    """Read the four tables from a local folder or ``s3://bucket/prefix``."""
    if uri.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="llmops-ingest-") as tmp:
            _download_s3_prefix(uri, Path(tmp), s3_endpoint_url)
            return _read_folder(Path(tmp), label=uri.rstrip("/"))[0]
    folder = Path(uri)
    if not folder.is_dir():
        raise StageError(f"ingest.source.uri: folder {uri} does not exist")
    return _read_folder(folder, label=str(folder))[0]


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


def _read_folder(folder: Path, label: str, optional: bool = False) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """The tables in ``folder`` and their files' SHA-256. ``optional``: a table may be absent
    (at least one must be there)."""
    tables, hashes = {}, {}
    for name, required in SCHEMA.items():
        candidates = [folder / f"{name}.parquet", folder / f"{name}.jsonl"]
        found = [p for p in candidates if p.exists()]
        if not found and optional:
            continue
        if not found:
            raise StageError(f"{label}: missing table {name!r} (expected {name}.parquet or {name}.jsonl)")
        path = found[0]
        hashes[name] = file_sha256(path)
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
    if not tables:
        raise StageError(f"{label}: holds none of the tables {', '.join(SCHEMA)} (.parquet or .jsonl)")
    return tables, hashes


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
