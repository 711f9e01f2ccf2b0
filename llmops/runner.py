"""Run one stage of a pipeline: the single code path under both `llmops run` (Prefect)
and `llmops stage` (what dvc.yaml calls).

A stage writes into ``<artifacts>/<pipeline>/<stage>.partial/`` and that folder replaces
``<artifacts>/<pipeline>/<stage>/`` only when the stage succeeded, so a failed run never
leaves a half-written stage folder where the next stage (or DVC) would read it. When a
stage fails on its input, what it wrote (e.g. validation reports) is kept in
``<stage>.failed/`` for a person to read.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from components.base import StageError, StageIO, StageResult, write_json
from llmops.spec import Spec
from llmops.stages import METRICS_FILE, STAGES


def configure_environment(spec: Spec, root: Path) -> None:
    """Point Prefect, MLflow and Hugging Face at the project's state folder, unless the
    environment already says otherwise. Must run before Prefect is imported."""
    state = spec.state_dir(root)
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    if spec.services.prefect.api_url:
        os.environ["PREFECT_API_URL"] = spec.services.prefect.api_url
    os.environ.setdefault("MLFLOW_TRACKING_URI", spec.services.mlflow.tracking_uri
                          or f"sqlite:///{state / 'mlflow' / 'mlflow.db'}")


def stage_dir(spec: Spec, root: Path, pipeline: str, stage: str) -> Path:
    return spec.artifacts_dir(root) / pipeline / stage


def execute_stage(spec: Spec, root: Path, pipeline: str, stage: str) -> StageResult:
    """Run ``stage`` of ``pipeline``; returns its result with paths in the final folder.
    Raises StageError when an input stage has not produced its outputs."""
    definition = STAGES[stage]
    _, pipe = spec.pipeline(pipeline)
    if stage not in pipe.stages:
        raise StageError(f"pipeline {pipeline!r} has no stage {stage!r} (stages: {', '.join(pipe.stages)})")
    inputs = {}
    for need in definition.needs:
        folder = stage_dir(spec, root, pipeline, need)
        missing = [f for f in STAGES[need].outputs if not (folder / f).exists()]
        if missing:
            raise StageError(f"stage {stage!r} needs the outputs of {need!r} ({', '.join(missing)} missing "
                             f"in {folder}); run `llmops run --until {need}` or `llmops stage {need}` first")
        inputs[need] = folder
    final = stage_dir(spec, root, pipeline, stage)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    read_sections = {key.split(".")[0] for key in definition.reads}
    io = StageIO(pipeline=pipeline, out_dir=partial, inputs=inputs, state_dir=spec.state_dir(root),
                 s3_endpoint_url=spec.services.storage.s3_endpoint_url,
                 sections={name: pipe.section(name) for name in read_sections}, models=dict(spec.models),
                 feature_repo=(root / spec.services.feast.repo).resolve())
    failed = final.with_name(final.name + ".failed")
    try:
        result = definition.run(pipe.section(stage), io)
    except StageError as exc:
        # Keep what the failed run wrote (reports, Data Docs) for a person to read.
        shutil.rmtree(failed, ignore_errors=True)
        if any(partial.iterdir()):
            partial.rename(failed)
            raise StageError(f"{exc}\n(outputs of the failed run: {failed})") from exc
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(failed, ignore_errors=True)
    write_json(partial / METRICS_FILE, result.metrics)
    undeclared = [f for f in definition.outputs if not (partial / f).exists()]
    if undeclared:
        raise StageError(f"stage {stage!r} did not write {', '.join(undeclared)}")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    result.outputs = {k: final / Path(p).relative_to(partial) for k, p in result.outputs.items()}
    return result


def select_stages(stages: list[str], start: str | None, until: str | None) -> list[str]:
    """The slice of ``stages`` from ``start`` to ``until`` (both inclusive)."""
    for label, name in (("--from", start), ("--until", until)):
        if name is not None and name not in stages:
            raise StageError(f"{label} {name!r}: not a stage of this pipeline (stages: {', '.join(stages)})")
    lo = stages.index(start) if start else 0
    hi = stages.index(until) + 1 if until else len(stages)
    if lo >= hi:
        raise StageError(f"--from {start!r} comes after --until {until!r}")
    return stages[lo:hi]
