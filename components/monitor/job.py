"""One monitoring run: a window of the request log against the served version's training
prompts, the signals, the Evidently report, the summary, the history of runs.

What it writes under ``<state>/monitor/<pipeline>/``: ``runs/<UTC time>/report.html``
(Evidently) and ``summary.json``; ``history.jsonl`` (one summary per run) and
``history.png`` (each signal over the last runs, with its threshold); the reference copy
and its embeddings (``reference/``); the window's embeddings per text, kept for the next
runs (``embeddings/``, components/monitor/embeddings.py); the Evidently workspace (``workspace/``, browse it
with ``evidently ui --workspace <that folder>``).
"""
from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from components.base import StageError, write_json
from components.monitor.embeddings import TextEmbeddings, bf16_supported, encoder
from components.monitor.reference import find_reference
from components.monitor.settings import MonitorSpec
from components.monitor.signals import compute, reference_frame, window_frame
from components.monitor.window import read_window

HISTORY_RUNS = 30  # runs drawn in history.png


@dataclass
class Served:
    """The version whose traffic is monitored: ``name/version``, its files, its MLflow run."""
    id: str
    manifest: dict
    folder: Path
    run_id: str | None
    tokenizer: object
    schema: object  # components.task.AnswerSchema


def run(cfg: MonitorSpec, served: Served, log_source: str, out: Path, artifacts_prepare: Path,
        embedder: Callable[[], object], s3_endpoint_url: str | None = None,
        say: Callable[[str], None] = lambda line: None, embedding_model: str = "") -> dict:
    """Monitor once; returns the summary (also written to the run folder). ``embedder()``
    loads ``embedding_model`` (its name keys the kept reference embeddings)."""
    from components.lm import prompt_ids

    started = time.perf_counter()
    timings: dict[str, float] = {}  # seconds per phase, in the summary
    with _timed(timings, "window"):
            window = read_window(log_source, served.id, cfg.routes, cfg.window.last_requests, cfg.window.hours,
                             s3_endpoint_url)
    say(f"window: {len(window.records):,} requests of {served.id} from {window.source} ({window.files} files"
        + (f"; {len(window.corrupt)} corrupt lines skipped, first {window.corrupt[0]}" if window.corrupt else "")
        + (f"; other versions skipped: {dict(window.other_versions)}" if window.other_versions else "") + ")")
    with _timed(timings, "reference"):
        ref = find_reference(served.manifest, cfg.reference_split, out / "reference", artifacts_prepare, served.run_id)
    say(f"reference: {len(ref.prompts):,} {ref.split} prompts, SHA-256 {ref.sha256[:12]}... ({ref.found_at})")

    def count(messages: list[dict]) -> int:
        return len(prompt_ids([m for m in messages if m.get("role") != "assistant"], served.tokenizer))

    with _timed(timings, "frames"):
        current = window_frame(window.records, count, served.schema.parse)
        reference = reference_frame(ref, count)
    # both sides with the same arithmetic: float32 unless signals.embeddings.bf16 (and the CPU
    # has it); the two are kept apart
    bf16 = cfg.signals.embeddings.bf16 and bf16_supported()
    model_key = embedding_model + (".bf16" if bf16 else "")
    cache = _ReferenceEmbeddings(out / "reference", f"{ref.sha256}.{re.sub(r'[^A-Za-z0-9_.-]+', '-', model_key)}",
                                 ref.texts, lambda: encoder(embedder(), bf16), say)
    kept = TextEmbeddings(out / "embeddings", model_key, lambda texts: cache.model()(texts))

    def embed(texts: list[str], side: str) -> np.ndarray:
        if side == "reference":
            return cache.get(texts)
        vectors = kept.get(texts)
        say(f"window embeddings: {kept.computed:,} computed, {kept.reused:,} kept from earlier runs")
        return vectors

    results, snapshot = compute(cfg.signals, current, reference, ref.texts, embed, cfg.seed, timings)
    stamp = datetime.now(timezone.utc)
    folder = out / "runs" / stamp.strftime("%Y%m%dT%H%M%SZ")
    folder.mkdir(parents=True, exist_ok=True)
    report = None
    if snapshot is not None:
        report = folder / "report.html"
        with _timed(timings, "report_html"):
            snapshot.save_html(str(report))
    first, last = window.span
    summary = {
        "time": stamp.isoformat(timespec="seconds"), "model": served.id,
        "window": {"source": window.source, "requests": len(window.records), "first": first, "last": last,
                   "files": window.files, "corrupt_lines": len(window.corrupt), "corrupt_examples": window.corrupt[:5],
                   "other_versions": dict(window.other_versions), "other_routes": window.other_routes,
                   "synthetic": window.synthetic},
        "reference": {"split": ref.split, "sha256": ref.sha256, "prompts": len(ref.prompts), "path": str(ref.path),
                      "found_at": ref.found_at},
        "signals": [r.dict() for r in results],
        "drifted": [r.name for r in results if r.drifted],
        "report": str(report) if report else None, "folder": str(folder),
    }
    with _timed(timings, "history"):
        _plot_history(out, summary)
    if snapshot is not None:
        with _timed(timings, "workspace"):
            _add_to_workspace(out / "workspace", served.id.split("/")[0], snapshot)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    write_json(folder / "summary.json", summary)
    with (out / "history.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    return summary


@contextmanager
def _timed(timings: dict[str, float], phase: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - started


class _ReferenceEmbeddings:
    """The reference prompts' embeddings, computed once per reference hash and kept."""

    def __init__(self, folder: Path, key: str, texts: list[str], embedder, say):
        self.path = folder / f"{key}.embeddings.npy"
        self.texts, self._embedder, self._model, self.say = texts, embedder, None, say
        self._matrix: np.ndarray | None = None

    def model(self):
        if self._model is None:
            self._model = self._embedder()
        return self._model

    def get(self, texts: list[str]) -> np.ndarray:
        if self._matrix is None:
            if self.path.exists():
                self._matrix = np.load(self.path)
            else:
                self.say(f"embedding the {len(self.texts):,} reference prompts (once; kept in {self.path.parent})")
                self._matrix = self.model()(self.texts)
                partial = self.path.with_suffix(".partial.npy")
                np.save(partial, self._matrix)
                partial.replace(self.path)
            if len(self._matrix) != len(self.texts):
                raise StageError(f"{self.path}: {len(self._matrix)} rows for {len(self.texts)} prompts; delete it")
        index = {t: i for i, t in enumerate(self.texts)}
        return self._matrix[[index[t] for t in texts]]


def history(out: Path, last: int = HISTORY_RUNS) -> list[dict]:
    path = out / "history.jsonl"
    if not path.exists():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines()[-last:]:
        try:
            runs.append(json.loads(line))
        except ValueError:
            continue
    return runs


def _plot_history(out: Path, latest: dict) -> None:
    """history.png: each signal's value over the last runs (``latest``: this run, not yet in
    history.jsonl), its threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = history(out, HISTORY_RUNS - 1) + [latest]
    names = list(dict.fromkeys(s["name"] for r in runs for s in r["signals"]))
    if not names:
        return
    cols = 2
    fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(11, 2.2 * ((len(names) + 1) // cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(i, s["value"], s["threshold"], s["status"]) for i, r in enumerate(runs) for s in r["signals"]
                  if s["name"] == name]
        xs = [p[0] for p in points if p[1] is not None]
        ax.plot(xs, [p[1] for p in points if p[1] is not None], marker="o", ms=3)
        ax.scatter([p[0] for p in points if p[3] == "drift"], [p[1] for p in points if p[3] == "drift"], c="red", zorder=3)
        if points:
            ax.axhline(points[-1][2], ls="--", c="grey", lw=1)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"drift signals, last {len(runs)} runs (red: drift; dashed: threshold)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=80)
    plt.close(fig)


def _add_to_workspace(folder: Path, project_name: str, snapshot) -> None:
    from evidently.ui.workspace import Workspace

    ws = Workspace.create(str(folder))
    found = ws.search_project(project_name)
    project = found[0] if found else ws.create_project(project_name, description="llmops drift monitoring")
    ws.add_run(project.id, snapshot)
