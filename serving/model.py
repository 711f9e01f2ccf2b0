"""The model a registry version holds, fetched and checked before anything is loaded.

A version (components/register.py) holds ``adapter/`` (safetensors), ``serving/`` when the
pipeline compressed (the variant compress chose, e.g. ONNX int8) and ``llmops-model.json``,
the manifest: the base model by catalog name and SHA-256, the adapter's SHA-256, the
serving files' SHA-256, the prompt settings and the answer's JSON Schema. Serving loads
``serving/`` when the version has it, else the catalog's base model with the adapter merged;
every file is checked against the manifest first, and a mismatch is refused. A gateway in
front of another engine (serve.upstream) loads the tokenizer only, with the same checks on
the files it reads.

References: ``support-triage@champion`` (an alias), ``support-triage/3`` (a version), or a
bare name (its champion).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.catalog import ModelError, resolve, weights_sha256
from components.lm import load, load_tokenizer, verify_files
from components.registry import CHAMPION, RegistryError, aliases, client, version
from components.task import AnswerSchema

MANIFEST = "llmops-model.json"
# In a fetched copy: the artifact URI it was downloaded from. Version numbers are only unique
# within one registry; a state folder used with another tracking URI (the embedded store, then
# a server) holds copies of another registry's version 1, 2, ... that must not be served.
SOURCE = ".llmops-source"


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    number: int | None = None

    @classmethod
    def parse(cls, ref: str) -> "ModelRef":
        """``name@alias`` | ``name/version`` | ``name`` (its champion)."""
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return cls(name, alias=alias)
        if "/" in ref:
            name, number = ref.rsplit("/", 1)
            if not number.isdigit():
                raise ValueError(f"{ref!r}: expected name/<version number> or name@<alias>")
            return cls(name, number=int(number))
        return cls(ref, alias=CHAMPION)

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.number}"


@dataclass
class ServedModel:
    """What the engine runs and the API describes."""
    name: str
    version: int
    alias: str | None
    variant: str  # the compressed variant (e.g. int8_weight) or "base+adapter"
    manifest: dict
    tokenizer: Any
    model: Any  # None: the tokenizer only (another engine generates)
    schema: AnswerSchema
    folder: Path
    load_s: float
    loaded_at: float = field(default_factory=time.time)

    @property
    def id(self) -> str:
        """The model id clients send and /v1/models lists: ``name/version``."""
        return f"{self.name}/{self.version}"


def find_version(ref: ModelRef) -> tuple[int, Any]:
    """(version number, MLflow ModelVersion) that ``ref`` names now; RegistryError if none."""
    c = client()
    if ref.alias is not None:
        current = aliases(c, ref.name)
        if ref.alias not in current:
            held = ", ".join(f"{a} -> {v}" for a, v in sorted(current.items())) or "none"
            hint = " (promote a version first: llmops promote)" if ref.alias == CHAMPION else ""
            raise RegistryError(f"{ref.name} has no alias {ref.alias!r}{hint}; aliases: {held}")
        number = current[ref.alias]
    else:
        number = ref.number
    return number, version(c, ref.name, number)


def fetch(ref: ModelRef, cache: Path) -> tuple[int, Path]:
    """Download the version's files into ``cache/<name>/<version>/`` (once: a complete copy
    downloaded from the version's artifact URI is reused; a partial one, or one of another
    registry's version with the same number, is replaced). Returns (version number, folder)."""
    import mlflow

    number, found = find_version(ref)
    folder = cache / ref.name / str(number)
    if (folder / MANIFEST).exists() and (folder / SOURCE).exists() and (folder / SOURCE).read_text() == found.source:
        return number, folder
    partial = folder.with_name(f".{number}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=found.source, dst_path=str(partial))
    except Exception as exc:  # noqa: BLE001 - any download failure is the registry's artifacts being unreachable
        shutil.rmtree(partial, ignore_errors=True)
        raise RegistryError(f"{ref.name} version {number}: cannot download its files from {found.source}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    inner = partial / "model" if (partial / "model" / MANIFEST).exists() else partial
    if not (inner / MANIFEST).exists():
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelError(f"{ref.name} version {number} holds no {MANIFEST}: not a version the register stage wrote")
    (inner / SOURCE).write_text(found.source)
    shutil.rmtree(folder, ignore_errors=True)
    inner.rename(folder)
    shutil.rmtree(partial, ignore_errors=True)
    return number, folder


def fetched(name: str, number: int, state_dir: Path) -> tuple[Path, dict]:
    """Version ``number`` of ``name``: its folder in the state folder's cache (fetched once,
    as serving fetches it) and its manifest. RegistryError / ModelError as ``fetch``."""
    _, folder = fetch(ModelRef(name, number=number), state_dir / "serving" / "versions")
    return folder, json.loads((folder / MANIFEST).read_text())


def answer_schema(manifest: dict) -> AnswerSchema:
    """The answer's JSON Schema a version was trained and evaluated with."""
    answer = manifest["answer_schema"]
    return AnswerSchema(answer["schema"], answer.get("ordered"))


WEIGHT_FILES = (".safetensors", ".onnx", ".onnx_data", ".onnx.data", ".bin")


def load_folder(folder: Path, catalog: dict, state_dir: Path, weights: str = "serving",
                tokenizer_only: bool = False) -> tuple[str, Any, Any]:
    """(variant, tokenizer, model) from a version's folder, every file checked against the
    manifest first. ``weights``: ``serving`` (the compressed variant when the version has
    one) or ``adapter`` (always base + adapter, PyTorch fp32). ``tokenizer_only``: model is
    None, and of the weights only the adapter (small) is checked. Raises ModelError naming
    the file at fault."""
    manifest = json.loads((folder / MANIFEST).read_text())
    serving = manifest.get("serving")
    if serving and weights == "serving":
        where = folder / serving.get("folder", "serving")
        if tokenizer_only:  # every recorded file but the weights: the tokenizer and configs it reads
            verify_files(where, {name: digest for name, digest in serving["files_sha256"].items()
                                 if not name.endswith(WEIGHT_FILES)})
            return serving["variant"], load_tokenizer(where), None
        tokenizer, model = load(where, expected_sha256=serving["files_sha256"])
        return serving["variant"], tokenizer, model
    adapter = folder / "adapter"
    verify_files(adapter, {"adapter_model.safetensors": manifest["adapter_sha256"]})
    if tokenizer_only:  # the base model's weights are not read, so not checked
        return "base+adapter", load_tokenizer(adapter), None
    base = manifest["base_model"]
    path = resolve(base["name"], catalog, state_dir)
    actual = weights_sha256(path, state_dir)
    if actual != base["sha256"]:
        raise ModelError(f"base model {base['name']} at {path}: weights SHA-256 {actual[:12]}... is not the "
                         f"{base['sha256'][:12]}... this version was trained on; refusing to load it")
    tokenizer, model = load(path, adapter=adapter)
    return "base+adapter", tokenizer, model


def load_version(ref: ModelRef, catalog: dict, state_dir: Path, weights: str = "serving",
                 tokenizer_only: bool = False) -> ServedModel:
    """Fetch, check and load the version ``ref`` names (``weights``, ``tokenizer_only``: see
    load_folder). Raises RegistryError (no such model, alias or version; registry
    unreachable) or ModelError (a file missing or altered)."""
    started = time.perf_counter()
    number, folder = fetch(ref, state_dir / "serving" / "versions")
    variant, tokenizer, model = load_folder(folder, catalog, state_dir, weights, tokenizer_only)
    manifest = json.loads((folder / MANIFEST).read_text())
    return ServedModel(name=ref.name, version=number, alias=ref.alias, variant=variant, manifest=manifest,
                       tokenizer=tokenizer, model=model, schema=answer_schema(manifest),
                       folder=folder, load_s=round(time.perf_counter() - started, 2))

