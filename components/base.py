"""Pieces every stage shares: the strict config base, the typed report base, the stage I/O
contract, hashing.

A stage is a plain function ``run(cfg, io) -> StageResult``: its spec section and the
folders of the stages it reads, in; the files it wrote and its metrics, out. Nothing
here knows about Prefect or DVC, so both can wrap the same function.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Config base: unknown keys are errors (a typo fails with its path), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def variable_name(name: str | None, never: str = "its value") -> str | None:
    """A setting that names an environment variable (one that holds a key, a password, a
    role) holds a name, never the secret: ValueError otherwise, saying it is ``never`` the
    secret. The bad value is not echoed: it may be the secret."""
    if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"must be the name of an environment variable (letters, digits, _), never {never}")
    return name


class StageError(RuntimeError):
    """A stage could not do its work because of its input or config; the message says what."""


class Report(BaseModel):
    """A stage's typed report (components/reports.py): written as JSON into the stage's
    folder, read back by the stages and commands after it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FILE: ClassVar[str] = "metrics.json"

    @classmethod
    def read(cls, where: Path) -> "Report":
        """The report in folder ``where`` (or the file ``where``); StageError naming the file
        when it is missing or does not hold this report."""
        path = Path(where) / cls.FILE if Path(where).is_dir() else Path(where)
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise StageError(f"{path}: missing; run the stage that writes it") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            raise StageError(f"{path}: not a {cls.__name__} ({'.'.join(map(str, first['loc']))}: {first['msg']}); "
                             "run the stage that writes it again") from None

    def write(self, folder: Path) -> Path:
        return write_json(Path(folder) / self.FILE, self.model_dump(mode="json"))


@dataclass(frozen=True)
class StageIO:
    """Where a stage reads and writes.

    ``inputs`` maps each stage this one needs to that stage's output folder;
    ``out_dir`` is this stage's own folder (``artifacts/<pipeline>/<stage>/``);
    ``state_dir`` holds local state shared by stages (models, caches);
    ``s3_endpoint_url`` points boto3 at an S3-compatible server (None: AWS itself);
    ``sections`` holds other spec sections the stage declared it reads (e.g. validate
    reads prepare's split rule); ``models`` is the spec's model catalog;
    ``feature_repo`` is the Feast repository folder; ``context`` says which run this is
    (git commit, spec hash, MLflow run ids) for stages that record provenance; ``root`` is
    the spec's folder.
    """

    pipeline: str
    out_dir: Path
    inputs: dict[str, Path] = field(default_factory=dict)
    state_dir: Path = Path(".llmops")
    s3_endpoint_url: str | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    feature_repo: Path = Path("feature_repo")
    context: dict[str, Any] = field(default_factory=dict)
    root: Path = Path(".")  # the spec's folder: relative data paths in the spec are relative to it


@dataclass
class StageResult:
    """What a stage produced: output files by name, its typed report (written as its
    metrics.json), a Markdown summary."""

    outputs: dict[str, Path]
    report: Report
    summary: str

    @property
    def metrics(self) -> dict[str, Any]:
        return self.report.model_dump(mode="json")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as stable, indented JSON (sorted keys) so diffs and hashes are stable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table from a list of dicts sharing the same keys."""
    if not rows:
        return "_(empty)_"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def plain(value):
    """A table cell as a JSON value: numpy scalars as Python ones, NaN/NA/None as None."""
    if value is None or type(value).__name__ == "NAType" or value != value:
        return None
    return value.item() if hasattr(value, "item") else value
