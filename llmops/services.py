"""The services a run talks to, checked before it starts, and their failures as one line.

A run that cannot reach MLflow, Prefect or the feature store fails at once with one line
naming the service, where it was looked for and what to do, exit code 1, no traceback;
a service that fails in the middle of a stage is reported the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

TIMEOUT_S = 5.0


class ServiceError(RuntimeError):
    """A service the run needs does not answer; the message says which and what to do."""


def _get(url: str) -> None:
    import httpx

    httpx.get(url, timeout=TIMEOUT_S).raise_for_status()


def _why(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def check_mlflow(uri: str) -> None:
    """Raise ServiceError unless the MLflow tracking store at ``uri`` answers (a server's
    /health, or a SQLite file whose folder can be written)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            _get(uri.rstrip("/") + "/health")
        except Exception as exc:  # noqa: BLE001 - any failure means: not reachable
            raise ServiceError(f"MLflow tracking server at {uri} is unreachable ({_why(exc)}); start it, or unset "
                               "MLFLOW_TRACKING_URI (services.mlflow.tracking_uri) to use the local store") from None
    elif parsed.scheme == "sqlite":
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(f"MLflow store {uri}: cannot create {folder} ({exc.strerror})") from None
        if not os.access(folder, os.W_OK):
            raise ServiceError(f"MLflow store {uri}: {folder} is not writable")


def check_prefect(api_url: str | None) -> None:
    """Raise ServiceError unless the Prefect server at ``api_url`` answers (None: the
    ephemeral server, started by the run itself)."""
    if not api_url:
        return
    try:
        _get(api_url.rstrip("/") + "/health")
    except Exception as exc:  # noqa: BLE001
        raise ServiceError(f"Prefect server at {api_url} is unreachable ({_why(exc)}); start it (`prefect server "
                           "start`), or unset PREFECT_API_URL (services.prefect.api_url) to use an ephemeral "
                           "local server") from None


def describe(exc: BaseException) -> str | None:
    """One line for an exception raised because a service stopped answering; None when it
    is something else (a bug keeps its traceback)."""
    import mlflow

    name = type(exc).__module__ + "." + type(exc).__name__
    text = _why(exc)
    if name.startswith(("requests.", "urllib3.", "httpx.")) or isinstance(exc, ConnectionError):
        return f"a service stopped answering: {text}"
    if name.startswith("mlflow.") and ("connect" in text.lower() or "max retries" in text.lower()):
        return f"MLflow at {mlflow.get_tracking_uri()} stopped answering: {text}"
    if name.startswith(("pymilvus.", "grpc.")) or "milvus" in text.lower():
        return (f"the Feast online store (Milvus) failed: {text}; a Milvus Lite file is used by one process at "
                "a time: is another run using this state folder?")
    return None
