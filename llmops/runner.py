"""Run one stage of a pipeline: the single code path under both `llmops run` (Prefect)
and `llmops stage` (what dvc.yaml calls).

Under `llmops run` each stage runs in a fresh child process (:func:`execute_stage_isolated`),
as under DVC: models a stage loaded are freed when it ends, no thread pool of an earlier
stage slows a later one, and the embedded Milvus Lite store (one process at a time) is
released between stages.

A stage writes into ``<artifacts>/<pipeline>/<stage>.partial/`` and that folder replaces
``<artifacts>/<pipeline>/<stage>/`` only when the stage succeeded, so a failed run never
leaves a half-written stage folder where the next stage (or DVC) would read it. When a
stage fails on its input, what it wrote (e.g. validation reports) is kept in
``<stage>.failed/`` for a person to read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from components import tracking
from components.base import StageError, StageIO, StageResult
from llmops.services import describe
from llmops.spec import Spec, load_spec
from llmops.stages import STAGES

# Off for every tool that has it: nothing tries the network on its own.
TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "DVC_NO_ANALYTICS": "1"}
# Prefect gives its ephemeral server ~20 s to migrate a new database and start; on a busy
# 2-core machine that was not enough and the first run died. Generous, since it only waits.
PREFECT_STARTUP_S = "300"


def configure_environment(spec: Spec, root: Path) -> None:
    """Point Prefect, MLflow and Hugging Face at the project's state folder, unless the
    environment already says otherwise. Must run before Prefect is imported."""
    state = spec.state_dir(root)
    state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", PREFECT_STARTUP_S)
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    # gRPC's C core logs a "too_many_pings" GOAWAY to stderr when the Milvus Lite channel of a
    # finished stage idles for a few minutes while later stages run. This only hides the line:
    # a later Feast call in the same process can still fail to reconnect (README: known issue).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    # On a tracking server MLflow prints two "View run ... at: http://..." lines to stdout per
    # run (each stage, the pipeline, a monitoring run) into the command's report; the run
    # ids are in the logs and the tables already. Set it to false to have the links back.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # The spec decides (its defaults read the environment: ${PREFECT_API_URL:-}, ...).
    if spec.services.prefect.api_url:
        os.environ["PREFECT_API_URL"] = spec.services.prefect.api_url
    elif not os.environ.get("PREFECT_API_URL"):
        from llmops.stack import running_prefect

        if api := running_prefect(state):  # `llmops up` runs one for this state folder: use it
            os.environ["PREFECT_API_URL"] = api
    os.environ["MLFLOW_TRACKING_URI"] = (spec.services.mlflow.tracking_uri
                                         or f"sqlite:///{state / 'mlflow' / 'mlflow.db'}")
    if spec.services.feast.url:  # components/featureserver.py reads it in every process of the run
        os.environ["LLMOPS_FEATURE_SERVER"] = spec.services.feast.url


def flow_setup(spec_file: str, overrides: list[str], pipeline: str | None) -> tuple[Spec, str, Path]:
    """What a flow does first, whoever started it (the CLI, or a worker running a
    deployment): load the spec, point MLflow and the tools at the state folder. Returns
    (spec, pipeline name, project root)."""
    spec = load_spec(spec_file, overrides, pipeline)
    name, _ = spec.pipeline(pipeline)
    root = Path(spec_file).resolve().parent
    configure_environment(spec, root)
    return spec, name, root


def stage_dir(spec: Spec, root: Path, pipeline: str, stage: str) -> Path:
    return spec.artifacts_dir(root) / pipeline / stage


def git_commit(root: Path) -> str:
    """HEAD's commit, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        return (commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pipeline_document(spec: Spec, pipeline: str) -> dict:
    """The resolved pipeline section (with the models it can name) as plain JSON data."""
    _, pipe = spec.pipeline(pipeline)
    return {"pipeline": pipeline, **pipe.model_dump(mode="json", by_alias=True),
            "models": {k: v.model_dump(mode="json") for k, v in spec.models.items()}}


def spec_sha256(spec: Spec, pipeline: str) -> str:
    """Hash of the resolved pipeline: equal specs (after overrides and ${VAR}s) hash equal."""
    return hashlib.sha256(json.dumps(pipeline_document(spec, pipeline), sort_keys=True).encode()).hexdigest()


def _experiment_id(spec: Spec, root: Path, pipeline: str) -> str:
    """The pipeline's MLflow experiment; on the embedded store its artifacts go to the state folder."""
    import mlflow

    found = mlflow.get_experiment_by_name(pipeline)
    if found:
        return found.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (spec.state_dir(root) / "mlflow" / "artifacts").resolve().as_uri()
    return mlflow.create_experiment(pipeline, artifact_location=location)


def start_pipeline_run(spec: Spec, root: Path, pipeline: str, source: str) -> str:
    """Open the MLflow run of one pipeline run: the flattened resolved spec as params, the
    spec as an artifact, git commit, spec hash and system info as tags. Returns its id; the
    stages' runs nest under it; close it with :func:`end_pipeline_run`."""
    import mlflow

    document = pipeline_document(spec, pipeline)
    tags = {"llmops.pipeline": pipeline, "llmops.source": source, "llmops.git_commit": git_commit(root),
            "llmops.spec_sha256": spec_sha256(spec, pipeline),
            **{f"system.{k}": v for k, v in tracking.system_info().items()}}
    with mlflow.start_run(experiment_id=_experiment_id(spec, root, pipeline), run_name=pipeline, tags=tags) as run:
        tracking.log_params({k: v for k, v in document.items() if k != "models"})
        tracking.log_text(json.dumps(document, indent=2), "spec.json")
        run_id = run.info.run_id
    mlflow.MlflowClient().update_run(run_id, status="RUNNING")  # stays open while the stages run
    return run_id


def end_pipeline_run(run_id: str, ok: bool) -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, "FINISHED" if ok else "FAILED")


@contextlib.contextmanager
def _stage_run(spec: Spec, root: Path, pipeline: str, stage: str, parent_run_id: str | None):
    """The stage's MLflow run: nested under the pipeline's run, or on its own when the stage
    runs alone (`llmops stage`, `dvc repro`). Ends FAILED when the stage raises."""
    import mlflow

    tags = {"llmops.pipeline": pipeline, "llmops.stage": stage, "llmops.git_commit": git_commit(root),
            "llmops.spec_sha256": spec_sha256(spec, pipeline)}
    with mlflow.start_run(experiment_id=_experiment_id(spec, root, pipeline), run_name=stage,
                          parent_run_id=parent_run_id, tags=tags) as run:
        if parent_run_id is None:  # no pipeline run holds the params: the stage's own section
            tracking.log_params({stage: pipeline_document(spec, pipeline).get(stage, {})})
        yield run


def execute_stage(spec: Spec, root: Path, pipeline: str, stage: str,
                  parent_run_id: str | None = None, spec_file: str | Path | None = None,
                  overrides: list[str] | None = None) -> StageResult:
    """Run ``stage`` of ``pipeline`` inside its MLflow run; returns its result with paths in
    the final folder. Raises StageError when an input stage has not produced its outputs.
    ``spec_file`` and ``overrides``: what ``spec`` was loaded from (a stage that starts a
    process of the project, e.g. deploy's endpoint, starts it with the same spec)."""
    definition = STAGES[stage]
    _, pipe = spec.pipeline(pipeline)
    if stage not in pipe.stages:
        raise StageError(f"pipeline {pipeline!r} has no stage {stage!r} (stages: {', '.join(pipe.stages)})")
    inputs = {}
    for need in definition.inputs(pipe.stages):
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
    with _stage_run(spec, root, pipeline, stage, parent_run_id) as run:
        io = StageIO(pipeline=pipeline, out_dir=partial, inputs=inputs, state_dir=spec.state_dir(root),
                     s3_endpoint_url=spec.services.storage.s3_endpoint_url,
                     sections={name: pipe.section(name) for name in read_sections}, models=dict(spec.models),
                     feature_repo=(root / spec.services.feast.repo).resolve(), root=root,
                     context={"git_commit": run.data.tags["llmops.git_commit"],
                              "spec_sha256": run.data.tags["llmops.spec_sha256"], "mlflow_run_id": run.info.run_id,
                              "mlflow_parent_run_id": parent_run_id,
                              "spec_file": str(Path(spec_file).resolve() if spec_file else root / "pipelines.yaml"),
                              "overrides": list(overrides or [])})
        try:
            result = _run_in_folder(definition, pipe.section(stage), io, partial, final)
        except StageError:
            raise
        except Exception as exc:
            line = describe(exc)
            if line is None:
                raise
            raise StageError(f"stage {stage!r}: {line}") from exc
        tracking.log_metrics(result.metrics)
        tracking.log_text(result.summary, "summary.md")
    return result


def _run_in_folder(definition, cfg, io: StageIO, partial: Path, final: Path) -> StageResult:
    """Run the stage into ``partial`` and swap it in for ``final`` on success."""
    stage = definition.name
    failed = final.with_name(final.name + ".failed")
    try:
        result = definition.run(cfg, io)
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
    result.report.write(partial)  # the stage's typed report is its metrics.json
    undeclared = [f for f in definition.outputs if not (partial / f).exists()]
    if undeclared:
        raise StageError(f"stage {stage!r} did not write {', '.join(undeclared)}")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    result.outputs = {k: final / Path(p).relative_to(partial) for k, p in result.outputs.items()}
    return result


def execute_stage_isolated(spec_file: str, overrides: list[str], pipeline: str, stage: str,
                           parent_run_id: str | None = None) -> StageResult:
    """:func:`execute_stage` in a fresh spawned child process (the environment is inherited;
    the spec is read again there). Its errors are raised here as they were raised there."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_child, spec_file, overrides, pipeline, stage, parent_run_id).result()


def _child(spec_file: str, overrides: list[str], pipeline: str, stage: str, parent_run_id: str | None) -> StageResult:
    spec = load_spec(spec_file, overrides, pipeline)
    return execute_stage(spec, Path(spec_file).resolve().parent, pipeline, stage, parent_run_id=parent_run_id,
                         spec_file=spec_file, overrides=overrides)


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
