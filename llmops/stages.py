"""The stage registry: stage name -> component function, spec section, inputs, outputs.

Adding a stage = one component module + its section in PipelineSpec (llmops/spec.py)
+ one line here + its stage in dvc.yaml (``llmops dvc generate`` writes it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from components import ingest, prepare
from components.base import StageIO, StageResult


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageResult]  # run(cfg, io) -> StageResult
    needs: tuple[str, ...]  # stages whose output folders this one reads
    outputs: tuple[str, ...]  # files it writes in its folder (DVC outs)
    code: tuple[str, ...]  # source files it depends on (DVC deps)
    doc: str


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", ingest.run, (), ingest.OUTPUTS,
          ("components/ingest.py", "components/generate.py"),
          "bring raw tickets, customers, profiles and articles into the run folder"),
    Stage("prepare", prepare.run, ("ingest",), prepare.OUTPUTS, ("components/prepare.py",),
          "point-in-time profile join, chat-formatted examples, hashed train/validation/test splits"),
)}

METRICS_FILE = "metrics.json"

__all__ = ["STAGES", "Stage", "StageIO", "StageResult", "METRICS_FILE"]
