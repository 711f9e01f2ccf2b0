"""MLflow tracking for the stages: metrics, params, artifacts and datasets of the active run.

Every call does nothing when no MLflow run is active, so a component works the same
called from a test, a notebook or the pipeline. The pipeline (llmops/runner.py) opens one
run per pipeline run and a nested run per stage; the tracking store is the spec's
``services.mlflow.tracking_uri`` (default: SQLite in the state folder).
"""
from __future__ import annotations

import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any


def active() -> bool:
    import mlflow

    return mlflow.active_run() is not None


def flatten(data: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [2, 3]} -> {"a.b": 1, "c": [2, 3]} (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def numeric(data: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of a (nested) dict, flattened; booleans and NaN are left out."""
    return {k: float(v) for k, v in flatten(data).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    import mlflow

    values = numeric(metrics)
    if values and active():
        mlflow.log_metrics(values, step=step)


def log_params(params: dict[str, Any]) -> None:
    """Flattened params; values longer than MLflow's limit are cut (the full spec is an artifact)."""
    import mlflow

    if not active():
        return
    flat = {k: ("null" if v is None else str(v))[:6000] for k, v in flatten(params).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        mlflow.log_params(dict(items[i:i + 100]))


def set_tags(tags: dict[str, Any]) -> None:
    import mlflow

    if tags and active():
        mlflow.set_tags({k: str(v)[:5000] for k, v in tags.items()})


def log_artifacts(path: Path, artifact_path: str | None = None) -> None:
    import mlflow

    if not active():
        return
    if Path(path).is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    if active():
        mlflow.log_text(text, artifact_file)


def log_dataset(path: Path, sha256: str, name: str, context: str, rows: int | None = None) -> None:
    """Record a data file as a run input, identified by its SHA-256 (MLflow's dataset digest)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if not active():
        return
    with warnings.catch_warnings():
        # MLflow registers its local-file source class twice and warns that a path is ambiguous
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        source = resolve_dataset_source(str(Path(path).resolve()))
    dataset = MetaDataset(source=source, name=name, digest=sha256[:36])
    tags = {"sha256": sha256} | ({"rows": str(rows)} if rows is not None else {})
    mlflow.log_input(dataset, context=context, tags=tags)


def system_info() -> dict[str, str]:
    """Where a run ran: Python, torch and its device, CPU count, memory, OS."""
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": str(os.cpu_count())}
    try:
        import psutil

        info["memory_gib"] = f"{psutil.virtual_memory().total / 2**30:.1f}"
    except ImportError:  # pragma: no cover - psutil ships with the lock
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = str(torch.get_num_threads())
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:  # pragma: no cover
        pass
    return info
