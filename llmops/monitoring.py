"""One monitoring run for a pipeline's served version, as `llmops monitor` and the monitor
flow run it: resolve the version in the registry, read the log the endpoint writes, compute
the signals (components/monitor), record them as an MLflow run linked to the version, and
alert. Prefect (the event, the artifact) is the flow's part (flows/monitor.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from components import tracking
from components.base import StageError
from components.monitor import alerts, job
from llmops.spec import Spec


def monitor_folder(spec: Spec, root: Path, pipeline: str) -> Path:
    return spec.state_dir(root) / "monitor" / pipeline


def log_source(spec: Spec, root: Path, pipeline: str, model_name: str) -> str:
    """The request log the monitor reads: ``monitor.log``, else where `llmops serve` writes it."""
    pipe = spec.pipelines[pipeline]
    if pipe.monitor.log:
        where = pipe.monitor.log
        return where if where.startswith("s3://") or Path(where).is_absolute() else str(root / where)
    folder = pipe.serve.request_log.folder
    if folder:
        return folder if Path(folder).is_absolute() else str(root / folder)
    return str(spec.state_dir(root) / "serving" / "requests" / model_name)


def served_version(spec: Spec, root: Path, pipeline: str, model: str | None) -> job.Served:
    """The version to monitor (``model``, else serve.model, else the champion), its files
    fetched and its manifest's tokenizer and answer schema loaded (no weights)."""
    from components.lm import load_tokenizer
    from serving.model import MANIFEST, ModelRef, answer_schema, fetch, find_version

    pipe = spec.pipelines[pipeline]
    try:
        ref = ModelRef.parse(model or pipe.serve.model or f"{pipe.register_.model_name}@champion")
    except ValueError as exc:
        raise StageError(f"--model {exc}") from None
    number, found = find_version(ref)
    _, folder = fetch(ref, spec.state_dir(root) / "serving" / "versions")
    manifest = json.loads((folder / MANIFEST).read_text())
    serving = manifest.get("serving")
    tokenizer = load_tokenizer(folder / (serving.get("folder", "serving") if serving else "adapter"))
    return job.Served(f"{ref.name}/{number}", manifest, folder, found.run_id, tokenizer, answer_schema(manifest))


def monitor_once(spec: Spec, root: Path, pipeline: str, model: str | None = None,
                 say: Callable[[str], None] = print) -> tuple[dict, dict]:
    """(summary, alert outcome) of one monitoring run."""
    import mlflow

    from components.featurestore import Embedder
    from llmops.runner import _experiment_id

    pipe = spec.pipelines[pipeline]
    cfg = pipe.monitor
    out = monitor_folder(spec, root, pipeline)
    served = served_version(spec, root, pipeline, model)
    source = log_source(spec, root, pipeline, served.id.split("/")[0])
    embedding_model = served.manifest.get("prompt", {}).get("embedding_model") or pipe.features.embedding_model

    def embedder():
        say(f"loading the embedding model {embedding_model}")
        return Embedder(embedding_model, spec.models, spec.state_dir(root))

    summary = job.run(cfg, served, source, out, spec.artifacts_dir(root) / pipeline / "prepare", embedder,
                      spec.services.storage.s3_endpoint_url, say, embedding_model)
    outcome = alerts.alert_run(cfg.alerts, summary, out / "alert_state.json", out / "alerts.jsonl")
    summary["alerts"] = {k: v for k, v in outcome.items() if k != "alerts"}
    with mlflow.start_run(experiment_id=_experiment_id(spec, root, pipeline), run_name="monitor",
                          tags={"llmops.pipeline": pipeline, "llmops.kind": "monitor", "llmops.model_version": served.id,
                                "llmops.drifted": ",".join(summary["drifted"]),
                                "mlflow.note.content": f"drift monitoring of {served.id}"}) as run:
        tracking.log_metrics({f"drift.{s['name']}": s["value"] for s in summary["signals"] if s["value"] is not None}
                             | {"window.requests": summary["window"]["requests"],
                                "drift.signals_drifted": len(summary["drifted"])})
        # the summary only: the HTML report (~4 MB) stays in the run folder, named by the tag
        tracking.log_artifacts(Path(summary["folder"]) / "summary.json", "monitor")
        mlflow.set_tag("llmops.report", str(summary["report"]))
        summary["mlflow_run_id"] = run.info.run_id
    name, number = served.id.split("/")
    mlflow.MlflowClient().set_model_version_tag(name, number, "monitor.last_run", run.info.run_id)
    (Path(summary["folder"]) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary, outcome
