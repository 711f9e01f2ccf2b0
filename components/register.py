"""register: the fine-tuned model as a new version in the MLflow model registry, alias ``challenger``.

What a version holds (its artifacts, under ``model/``): the adapter (safetensors) and its
tokenizer, ``llmops-model.json`` naming the base model by catalog entry and SHA-256 of its
weights plus the prompt settings serving must use and a golden example (the first
validation chat, which serving answers before it takes traffic), and a model card (``README.md``). The
base weights are referenced, not copied: a LoRA adapter is ~20 MB, the merged model
~540 MB per version, and the hash makes the reference exact (serving refuses other
weights). When the pipeline has a compress stage, the variant it chose (e.g. ONNX int8) is
added under ``model/serving/`` with its file hashes in the manifest, so serving loads it
without rebuilding it. The version is tagged with the git commit, the spec hash, the data
hashes and the headline metrics; the ``challenger`` alias moves to it (recorded in the
registry's audit log, see components/registry.py). When the pipeline checks gates before
registering, the gate report goes into the version (``model/gates.json``, a section of the
model card) and its outcome into tags: ``gates.status`` (passed/failed) and
``gates.failed`` (the names of the failed gates). The run that registers also keeps the data
splits (``data/<split>.jsonl``, hashes in the manifest): monitoring compares live traffic
with the version's own training prompts.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pydantic import Field

from components import registry, tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table, write_json
from components.catalog import base_model_path, weights_sha256
from components.measure import PREDICTIONS
from components.reports import (CompressReport, EvaluationReport, GateReport, PrepareReport, RegistrationReport,
                                TrainingReport)
from components.splits import read_examples
from components.task import AnswerSchema

OUTPUTS = ("model",)
MANIFEST = "llmops-model.json"


class RegisterSpec(StrictModel):
    model_name: str = Field("support-triage", min_length=1)  # registered model in the MLflow registry
    alias: str = Field("challenger", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")  # set on the new version
    description: str = "Triages Tessera support tickets: intent, priority and help-center article as JSON."
    license: str = "apache-2.0"  # the base model's licence (SmolLM2: Apache 2.0); the adapter inherits it
    limitations: list[str] = []  # known limits for the model card (data, languages, biases)


def build_package(folder: Path, adapter: Path, manifest: dict, card: str, gates: GateReport | None = None,
                  serving: Path | None = None, predictions: Path | None = None) -> Path:
    """The folder a version holds: adapter/, serving/ (the chosen compressed variant, if any),
    the manifest (with the answer schema), the model card (and the gate report), and
    evaluate's answers to each test chat (``predictions.jsonl``: a later candidate's
    ``vs_champion`` gates pair their answers with these, chat by chat)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapter, folder / "adapter")
    if predictions is not None and predictions.exists():
        shutil.copy2(predictions, folder / PREDICTIONS)
    if gates is not None:
        write_json(folder / "gates.json", gates.model_dump(mode="json"))
    if serving is not None:
        shutil.copytree(serving, folder / "serving")
    write_json(folder / MANIFEST, manifest)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def serving_entry(compress_dir: Path) -> dict:
    """The manifest's ``serving`` entry for compress's chosen variant: what it is, its files'
    hashes, and how it measured against the uncompressed model."""
    report = CompressReport.read(compress_dir)
    v = report.served
    folder = compress_dir / "model"
    return {"variant": report.chosen, "format": v.format, "folder": "serving",
            "files_sha256": {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file()},
            "reason": report.reason,
            "validation": {"size_mib": v.size_mib, "tokens_per_s_batch1": v.tokens_per_s_batch1,
                           "tokens_per_s_batched": v.tokens_per_s_batched, "batch_size": report.batch_size,
                           "request_latency_p95_ms": v.request_latency_p95_ms, "exact_match": v.quality.exact_match,
                           "json_valid_rate": v.quality.json_valid_rate, "perplexity": v.quality.perplexity,
                           "jaccard_at_1": v.jaccard_at.get(1)},
            "vs_uncompressed": v.vs_reference, "measured_on": report.cpu}


def _serving_card(manifest: dict) -> str:
    serving = manifest.get("serving")
    if not serving:
        return ""
    v, r = serving["validation"], serving["vs_uncompressed"]
    return (f"\n## Serving variant\n\n`serving/` holds **{serving['variant']}** ({serving['format']}), chosen by the "
            f"compress stage: {serving['reason']}.\n\n| | |\n|---|---|\n| size | {v['size_mib']} MiB "
            f"({100 * r['size_ratio']:.0f}% of the merged fp32 model) |\n| tokens/s at batch 1 | "
            f"{v['tokens_per_s_batch1']} ({r['speedup_batch1']}x) |\n| exact match (validation) | {v['exact_match']} "
            f"({100 * r['exact_match_change']:+.1f} pts) |\n| top-1 agreement with the fp32 model | {v['jaccard_at_1']} |\n")


def model_card(cfg: RegisterSpec, manifest: dict, evaluation: EvaluationReport, training: TrainingReport,
               splits: PrepareReport, gates: GateReport | None = None) -> str:
    """The version's README.md: description, data, results, usage, limitations, licence."""
    cand, base = evaluation.candidate.flat(), evaluation.base.flat()
    headline = ["exact_match", "json_valid_rate", *(f"{f}_accuracy" for f in evaluation.candidate.field_accuracy),
                "perplexity", "latency_p50_ms", "latency_p95_ms", "generated_tokens_per_s"]
    rows = [{"metric": k, "fine-tuned": cand.get(k, ""), "base model": base.get(k, "")} for k in headline]
    data_rows = [{"split": s, "examples": m.examples, "sha256": m.sha256} for s, m in splits.splits.items()]
    slice_rows = [{"slice": f"{field}={value}", "n": m["n"], "exact match": m["exact_match"]}
                  for field, values in evaluation.slices.get("candidate", {}).items() for value, m in values.items()]
    weakest = min(slice_rows, key=lambda r: r["exact match"]) if slice_rows else None
    gate_section = ""
    if gates is not None:
        gate_section = (f"\n## Gates: {gates.status}\n\n"
                        + markdown_table([{k: r[k] for k in ("gate", "observed", "threshold", "margin", "result")}
                                          for r in gates.rows()]) + "\n")
    limits = [*cfg.limitations,
              f"Weakest slice on the test split: {weakest['slice']} (exact match {weakest['exact match']}, "
              f"n={weakest['n']})." if weakest else "No slices were evaluated.",
              "Check every answer against the answer schema (`answer_schema` in llmops-model.json)."]
    retrieval = (f" and the top {manifest['prompt']['top_k']} articles retrieved for it"
                 if manifest["prompt"].get("retrieval") else "")
    return f"""# {cfg.model_name}

{cfg.description}

| | |
|---|---|
| base model | `{manifest['base_model']['name']}` (weights sha256 `{manifest['base_model']['sha256'][:16]}…`) |
| method | {manifest['method']['kind']} ({manifest['trainable_params']:,} trainable parameters) |
| trained | {training.steps} steps in {training.minutes} min on {training.device} ({training.dtype}) |
| git commit | `{manifest['git_commit']}` |
| spec sha256 | `{manifest['spec_sha256']}` |
| licence | {cfg.license} |

## Training data

Requests with their entity's features as of the request's time (Feast point-in-time
join){retrieval}, rendered as chats; split by a hash of the request id.

{markdown_table(data_rows)}

## Evaluation (test split, greedy decoding)

{markdown_table(rows)}

Exact match by slice:

{markdown_table(slice_rows)}
{gate_section}
## Usage

```python
import mlflow
from components.lm import load

folder = mlflow.artifacts.download_artifacts("models:/{cfg.model_name}@{cfg.alias}")
tokenizer, model = load("<folder of {manifest['base_model']['name']}>", adapter=Path(folder) / "adapter")
# Prompts: components/task.py build_messages with the manifest's prompt; answers: its answer_schema.
```
{_serving_card(manifest)}
## Limitations and biases

{chr(10).join(f"- {line}" for line in limits)}

## Licence

{cfg.license}, as the base model.
"""


def run(cfg: RegisterSpec, io: StageIO) -> StageResult:
    """Register the fine-tuned adapter as a new version of ``model_name`` with alias ``alias``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    ft_cfg = io.sections["finetune"]
    task = io.sections["task"]
    features_cfg = io.sections.get("features")
    base_path = Path(base_model_path(io))
    adapter = io.inputs["finetune"] / "adapter"
    training = TrainingReport.read(io.inputs["finetune"])
    evaluation = EvaluationReport.read(io.inputs["evaluate"])
    splits = PrepareReport.read(io.inputs["prepare"])
    schema = AnswerSchema.read(io.inputs["prepare"] / AnswerSchema.FILE)
    if evaluation.test_sha256 != splits.splits["test"].sha256:
        raise StageError("evaluate's metrics are for a different test split than prepare's "
                         f"({evaluation.test_sha256[:12]} vs {splits.splits['test'].sha256[:12]}); "
                         "run the evaluate stage again")
    base_sha = weights_sha256(str(base_path), io.state_dir)
    catalog_entry = io.models.get(ft_cfg.base_model)
    tagged = {k: v for k, v in evaluation.candidate.flat().items()
              if k in ("exact_match", "json_valid_rate", "perplexity") or k.endswith("_accuracy")}
    manifest = {
        "format": 2,
        "base_model": {"name": ft_cfg.base_model, "sha256": base_sha,
                       "source": catalog_entry.model_dump(mode="json") if catalog_entry is not None else None,
                       "parameters": training.total_params},
        "adapter_sha256": file_sha256(adapter / "adapter_model.safetensors"),
        "method": ft_cfg.method.model_dump(mode="json"),
        "trainable_params": training.trainable_params,
        "prompt": {"system_prompt": task.system_prompt, "user_template": task.user_template,
                   "retrieval_query": task.retrieval_query, "retrieval": task.uses_retrieval(),
                   "top_k": getattr(features_cfg, "top_k", None),
                   "embedding_model": getattr(features_cfg, "embedding_model", None),
                   "feature_service": getattr(features_cfg, "feature_service", None)},
        "answer_schema": {"schema": schema.schema, "ordered": schema.ordered},
        "golden": golden_example(io.inputs["prepare"]),
        "data_sha256": {s: m.sha256 for s, m in splits.splits.items()},
        "metrics": tagged | {"base_exact_match": evaluation.base.exact_match},
        "git_commit": io.context.get("git_commit", "unknown"),
        "spec_sha256": io.context.get("spec_sha256", "unknown"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    serving = io.inputs.get("compress")
    if serving is not None:
        manifest["serving"] = serving_entry(serving)
    gates = GateReport.read(io.inputs["gates"]) if "gates" in io.inputs else None
    if gates is not None and gates.test_sha256 != splits.splits["test"].sha256:
        raise StageError("the gate report is for a different test split than prepare's; run the gates stage again")
    card = model_card(cfg, manifest, evaluation, training, splits, gates)
    package = build_package(io.out_dir / "model", adapter, manifest, card, gates,
                            serving / "model" if serving is not None else None,
                            io.inputs["evaluate"] / PREDICTIONS)

    started = None if mlflow.active_run() else mlflow.start_run(run_name="register")
    try:
        run = mlflow.active_run()
        tracking.log_artifacts(package, "model")
        for split in manifest["data_sha256"]:  # what monitoring compares live traffic with, by hash
            tracking.log_artifacts(io.inputs["prepare"] / f"{split}.jsonl", "data")
        client = mlflow.MlflowClient()
        try:
            client.create_registered_model(cfg.model_name, description=cfg.description,
                                           tags={"llmops.pipeline": io.pipeline})
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {"git_commit": manifest["git_commit"], "spec_sha256": manifest["spec_sha256"],
                "base_model": ft_cfg.base_model, "base_model_sha256": base_sha,
                "adapter_sha256": manifest["adapter_sha256"], "llmops.pipeline": io.pipeline,
                **{f"data_sha256.{s}": h for s, h in manifest["data_sha256"].items()},
                **{f"metric.{k}": str(v) for k, v in manifest["metrics"].items()}}
        if "serving" in manifest:
            tags["serving_variant"] = manifest["serving"]["variant"]
        if gates is not None:
            tags |= {registry.GATE_STATUS_TAG: gates.status, registry.GATE_FAILED_TAG: ",".join(gates.failed)}
        version = client.create_model_version(cfg.model_name, source=f"{run.info.artifact_uri}/model",
                                              run_id=run.info.run_id, tags=tags, description=card)
        registry.move(client, cfg.model_name, cfg.alias, int(version.version),
                      f"registered by run {run.info.run_id}", "register")
    finally:
        if started is not None:
            mlflow.end_run()
    report = RegistrationReport(
        model_name=cfg.model_name, version=int(version.version), alias=cfg.alias, run_id=run.info.run_id,
        tracking_uri=mlflow.get_tracking_uri(), model_uri=version.source,
        gates_status=gates.status if gates is not None else None,
        gates_sha256=_gates_digest(gates) if gates is not None else None,
        serving_variant=manifest.get("serving", {}).get("variant"))
    gate_note = f", gates {gates.status}" if gates is not None else ""
    summary = (f"### register\n`{cfg.model_name}` version {version.version} -> alias `{cfg.alias}`{gate_note} "
               f"(base `{ft_cfg.base_model}` sha256 {base_sha[:12]}, adapter {manifest['adapter_sha256'][:12]}).\n\n"
               + markdown_table([{"metric": k, "value": v} for k, v in manifest["metrics"].items()]))
    return StageResult(outputs={"model": package}, report=report, summary=summary)


def golden_example(prepare_dir: Path) -> dict | None:
    """The first validation chat (prompt and gold answer): serving's readiness check answers
    it before the endpoint takes traffic."""
    examples = read_examples(prepare_dir / "validation.jsonl")[:1]
    if not examples:
        return None
    return {"messages": examples[0]["messages"][:-1], "answer": examples[0]["messages"][-1]["content"]}


def _gates_digest(gates: GateReport) -> str:
    """A digest of the gate report's content: promote checks it is the report this version holds."""
    return hashlib.sha256(json.dumps(gates.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
