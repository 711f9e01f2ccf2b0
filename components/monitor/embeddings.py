"""Embeddings of logged requests kept between monitoring runs, per text hash: successive
windows overlap (an hourly run over the last 1,000 requests sees most of them again), so
each request text is embedded once per model, not once per run.

One file per embedding model, ``<monitor folder>/embeddings/<model>.npz``: the texts'
BLAKE2b digests and their vectors, the most recently used first, at most ``MAX_ROWS``
(older ones are dropped when it is written again).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

import numpy as np

MAX_ROWS = 50_000  # kept vectors per model (MiniLM: 384 floats, ~77 MB at most)


def bf16_supported() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there MiniLM runs
    about twice as fast under bfloat16 autocast, its embeddings within 1e-4 cosine of float32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def encoder(model, bf16: bool) -> Callable[[list[str]], np.ndarray]:
    """``model.encode`` (components.featurestore.Embedder), under bfloat16 autocast with ``bf16``."""
    def encode(texts: list[str]) -> np.ndarray:
        if not bf16:
            return model.encode(texts)
        import torch

        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.encode(texts).astype(np.float32)
    return encode


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class TextEmbeddings:
    """``get(texts)``: their embeddings, the kept ones read, the others computed with
    ``encode`` and kept."""

    def __init__(self, folder: Path, model_name: str, encode: Callable[[list[str]], np.ndarray],
                 max_rows: int = MAX_ROWS):
        self.path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', model_name)}.npz"
        self.encode, self.max_rows = encode, max_rows
        self.computed = self.reused = 0

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            with np.load(self.path) as kept:
                return kept["keys"], kept["vectors"]
        except (OSError, ValueError, KeyError):  # none yet, or a torn file: start again
            return np.empty(0, dtype="S16"), np.empty((0, 0), dtype=np.float32)

    def get(self, texts: list[str]) -> np.ndarray:
        keys, vectors = self._load()
        row = {k: i for i, k in enumerate(keys.tolist())}
        wanted = [digest(t) for t in texts]
        missing = list(dict.fromkeys(k for k in wanted if k not in row))
        if missing:
            todo = set(missing)
            first = {k: t for k, t in zip(wanted, texts) if k in todo}
            fresh = self.encode([first[k] for k in missing]).astype(np.float32)
            if vectors.size and vectors.shape[1] != fresh.shape[1]:  # another model under the same name
                keys, vectors, row = np.empty(0, dtype="S16"), np.empty((0, fresh.shape[1]), np.float32), {}
            base = len(keys)
            keys = np.concatenate([keys, np.array(missing, dtype="S16")])
            vectors = np.concatenate([vectors.reshape(-1, fresh.shape[1]), fresh])
            row.update({k: base + i for i, k in enumerate(missing)})
        self.computed, self.reused = len(missing), len(set(wanted)) - len(missing)
        result = vectors[[row[k] for k in wanted]] if wanted else np.empty((0, vectors.shape[-1]), np.float32)
        # this run's texts first, then the others as they were; at most max_rows
        used = list(dict.fromkeys(row[k] for k in wanted))
        seen = set(used)
        order = used + [i for i in range(len(keys)) if i not in seen]
        order = order[:self.max_rows]
        if missing or order != list(range(len(keys))):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(self.path.stem + ".partial.npz")
            np.savez(partial, keys=keys[order], vectors=vectors[order])
            partial.replace(self.path)
        return result
