"""Kubernetes manifests checked offline against the schemas kept in ``infra/schemas/k8s/``
(one per kind, trimmed to the fields the project writes and strict about them:
infra/schemas/README.md). What a real API server would add is not known here."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SCHEMAS = Path(__file__).resolve().parents[2] / "infra" / "schemas" / "k8s"


@lru_cache(maxsize=None)
def _schema_text(kind: str) -> str:
    path = SCHEMAS / f"{kind.lower()}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCHEMAS.glob("*.json")))
        raise ValueError(f"no schema for kind {kind!r} in {SCHEMAS} (kinds with one: {known})")
    return path.read_text()


def schema(kind: str) -> dict:
    """The JSON Schema of ``kind`` (a fresh copy); ValueError when none is kept."""
    return json.loads(_schema_text(kind))


def problems(doc: dict) -> list[str]:
    """What is wrong with one manifest under its kind's schema, each as ``<JSON path>: <why>``
    (empty: valid)."""
    import jsonschema

    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
        return ["$: not a Kubernetes object (no kind)"]
    validator = jsonschema.Draft202012Validator(schema(doc["kind"]))
    return sorted(f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc))


def name_of(doc: dict) -> str:
    """``Kind/name`` of a manifest, for messages."""
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    return f"{doc.get('kind', '?') if isinstance(doc, dict) else '?'}/" \
           f"{meta.get('name', '?') if isinstance(meta, dict) else '?'}"


def check(docs: list[dict]) -> None:
    """Raise ValueError naming each document that its schema refuses, and where
    (``InferenceService/x: $.spec.predictor.minReplicas: 'one' is not of type 'integer'``)."""
    found = [f"{name_of(doc)}: {problem}" for doc in docs for problem in problems(doc)]
    if found:
        raise ValueError(f"{len(found)} schema error(s) in the manifests:\n  " + "\n  ".join(found))
