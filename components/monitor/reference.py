"""The reference traffic: the served version's own training prompts, found by the SHA-256
its manifest recorded for each split (components/register.py), never by whatever
``artifacts/`` holds now.

Where a split with that hash is looked for, in order: the monitor's own copy
(``<state>/monitor/<pipeline>/reference/<sha256>.jsonl``, kept the first time the split is
found, so a later pipeline run that rewrites ``artifacts/`` does not take the reference
away), prepare's output in ``artifacts/``, and the split the register stage logged with the
version's MLflow run (``data/<split>.jsonl``). A file with another hash is never used.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from components.base import StageError, file_sha256


@dataclass
class Reference:
    split: str
    sha256: str
    path: Path
    found_at: str  # where it was found: "monitor copy" | "artifacts" | "registry run"
    prompts: list[list[dict]]  # each example's messages without the answer
    labels: list[dict]

    @property
    def texts(self) -> list[str]:
        return [request_text(m) for m in self.prompts]


def request_text(messages: list[dict]) -> str:
    """What a request says: its user turns (the system prompt is the same for every request)."""
    return "\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "user")


def find_reference(manifest: dict, split: str, keep: Path, artifacts: Path, run_id: str | None) -> Reference:
    """The version's ``split`` with its recorded hash. StageError naming the hash and every
    place looked at when none holds it."""
    recorded = (manifest.get("data_sha256") or {}).get(split)
    if not recorded:
        raise StageError(f"the version's manifest records no {split!r} data hash (data_sha256: "
                         f"{sorted(manifest.get('data_sha256') or {})}); it cannot be monitored against its training data")
    copy = keep / f"{recorded}.jsonl"
    looked = []
    if copy.exists() and file_sha256(copy) == recorded:
        return _read(copy, split, recorded, "monitor copy")
    for where, candidate in (("artifacts", artifacts / f"{split}.jsonl"), ("registry run", None)):
        if candidate is None:
            candidate = _from_run(run_id, split) if run_id else None
            if candidate is None:
                looked.append(f"the version's MLflow run ({run_id or 'none'}: no data/{split}.jsonl)")
                continue
        if not candidate.exists():
            looked.append(f"{candidate} (missing)")
            continue
        actual = file_sha256(candidate)
        if actual != recorded:
            looked.append(f"{candidate} (SHA-256 {actual[:12]}..., another run's data)")
            continue
        keep.mkdir(parents=True, exist_ok=True)
        partial = copy.with_suffix(".partial")
        shutil.copyfile(candidate, partial)
        partial.replace(copy)
        return _read(copy, split, recorded, where)
    raise StageError(f"the served version's {split} data (SHA-256 {recorded[:12]}...) is nowhere to be found: "
                     + "; ".join(looked) + ". Re-create it (git checkout of the version's commit + `dvc repro prepare`"
                     ", or `dvc checkout`) or monitor another version")


def _from_run(run_id: str, split: str) -> Path | None:
    import mlflow

    try:
        folder = Path(tempfile.mkdtemp(prefix="llmops-reference-"))
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"data/{split}.jsonl",
                                                        dst_path=str(folder)))
    except Exception:  # noqa: BLE001 - a run without the file (or an unreachable store) is one place less
        return None


def _read(path: Path, split: str, sha256: str, found_at: str) -> Reference:
    prompts, labels = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
            messages = [m for m in example["messages"] if m.get("role") != "assistant"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StageError(f"{path}:{n}: not a prepared example ({exc})") from None
        prompts.append(messages)
        labels.append(example.get("labels") or {})
    if not prompts:
        raise StageError(f"{path}: the reference split {split!r} is empty")
    return Reference(split, sha256, path, found_at, prompts, labels)
