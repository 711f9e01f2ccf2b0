"""dvc.yaml from the spec and the stage registry, and the check that they agree.

Each pipeline stage becomes a DVC stage that runs ``llmops stage NAME``, tracks the
spec keys that stage reads (its section of pipelines.yaml) as params, its code and the
output files of the stages it needs as deps, its own files as outs, its
``metrics.json`` as a (git-tracked, uncached) metrics file, and its plot files (training
loss curve, confusion matrix) as uncached plots with their axes.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from llmops.spec import Spec
from llmops.stages import METRICS_FILE, STAGES

HEADER = ("# Generated from pipelines.yaml by `llmops dvc generate`; `llmops dvc check` and the\n"
          "# tests fail when the two disagree. Run the stages with `dvc repro` (venv activated).\n")
SHARED_CODE = ("components/base.py",)


def build(spec: Spec, spec_file: str = "pipelines.yaml", pipeline: str | None = None) -> dict:
    """The dvc.yaml document for ``pipeline`` (default: the spec's default pipeline)."""
    name, pipe = spec.pipeline(pipeline)
    artifacts = Path(spec.services.storage.artifacts_dir) / name
    stages = {}
    for stage in pipe.stages:
        definition = STAGES[stage]
        folder = artifacts / stage
        plotted = {f for plot in definition.plots for f in plot}
        cmd = f"llmops stage {stage}" + ("" if name == spec.default_pipeline else f" -p {name}")
        deps = [*definition.code, *SHARED_CODE]
        needs = (*definition.needs, *(n for n in definition.optional if n in pipe.stages))
        deps += [str(artifacts / need / f) for need in needs
                 for f in (*STAGES[need].outputs, METRICS_FILE) if f not in STAGES[need].metrics]
        stages[stage] = {
            "cmd": cmd,
            "deps": deps,
            "params": [{spec_file: [f"pipelines.{name}.{s}" for s in (stage, *definition.reads)]}],
            "outs": [str(folder / f) for f in definition.outputs
                     if f not in definition.metrics and f not in plotted],
            "metrics": [{str(folder / m): {"cache": False}} for m in (METRICS_FILE, *definition.metrics)],
        }
        if definition.plots:
            stages[stage]["plots"] = [{str(folder / f): {"cache": False, **props}}
                                      for plot in definition.plots for f, props in plot.items()]
    return {"stages": stages}


def render(doc: dict) -> str:
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=100)


def check(spec: Spec, dvc_file: Path, spec_file: str = "pipelines.yaml") -> list[str]:
    """Differences between ``dvc_file`` and what the spec implies; [] when they agree."""
    expected = build(spec, spec_file)["stages"]
    if not dvc_file.exists():
        return [f"{dvc_file}: missing; run `llmops dvc generate`"]
    actual = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})
    problems = []
    for stage in expected.keys() - actual.keys():
        problems.append(f"{dvc_file}: stage {stage!r} is in the spec but not in dvc.yaml")
    for stage in actual.keys() - expected.keys():
        problems.append(f"{dvc_file}: stage {stage!r} is not a stage of the spec's default pipeline")
    for stage in expected.keys() & actual.keys():
        for key, want in expected[stage].items():
            if actual[stage].get(key) != want:
                problems.append(f"{dvc_file}: stages.{stage}.{key} is {actual[stage].get(key)!r}, "
                                f"expected {want!r}")
    return sorted(problems)
