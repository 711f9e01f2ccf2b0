"""register: the fine-tuned model as a new version in the MLflow model registry, alias ``challenger``.

What a version holds (its artifacts, under ``model/``): the adapter (safetensors) and its
tokenizer, ``llmops-model.json`` naming the base model by catalog entry and SHA-256 of its
weights plus the prompt settings serving must use, and a model card (``README.md``). The
base weights are referenced, not copied: a LoRA adapter is ~20 MB, the merged model
~540 MB per version, and the hash makes the reference exact (serving refuses other
weights). When the pipeline has a compress stage, the variant it chose (e.g. ONNX int8) is
added under ``model/serving/`` with its file hashes in the manifest, so serving loads it
without rebuilding it. The version is tagged with the git commit, the spec hash, the data
hashes and the headline metrics; the ``challenger`` alias moves to it (recorded in the
registry's audit log, see components/registry.py). When the pipeline checks gates before
registering, the gate report goes into the version (``model/gates.json``, a section of the
model card) and its outcome into tags: ``gates.status`` (passed/failed) and
``gates.failed`` (the names of the failed gates).
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pydantic import Field

from components import registry, tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table, write_json
from components.models import weights_sha256

OUTPUTS = ("model", "registration.json")
MANIFEST = "llmops-model.json"
HEADLINE = ("exact_match", "json_valid_rate", "intent_accuracy", "priority_accuracy", "article_accuracy")
TAGGED = (*HEADLINE, "perplexity")  # recorded as metric.* tags: what champion gates compare


class RegisterSpec(StrictModel):
    model_name: str = Field("support-triage", min_length=1)  # registered model in the MLflow registry
    alias: str = Field("challenger", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")  # set on the new version
    description: str = "Triages Tessera support tickets: intent, priority and help-center article as JSON."
    license: str = "apache-2.0"  # the base model's licence (SmolLM2: Apache 2.0); the adapter inherits it


def build_package(folder: Path, adapter: Path, manifest: dict, card: str, gates: Path | None = None,
                  serving: Path | None = None) -> Path:
    """The folder a version holds: adapter/, serving/ (the chosen compressed variant, if any),
    the manifest, the model card (and the gate report)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(adapter, folder / "adapter")
    if gates is not None:
        shutil.copy(gates, folder / "gates.json")
    if serving is not None:
        shutil.copytree(serving, folder / "serving")
    write_json(folder / MANIFEST, manifest)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def serving_entry(compress_dir: Path) -> dict:
    """The manifest's ``serving`` entry for compress's chosen variant: what it is, its files'
    hashes, and how it measured against the uncompressed model."""
    report = json.loads((compress_dir / "metrics.json").read_text())
    chosen = report["chosen"]
    m = report["variants"][chosen]
    folder = compress_dir / "model"
    return {"variant": chosen, "format": m["format"], "folder": "serving",
            "files_sha256": {f.name: file_sha256(f) for f in sorted(folder.iterdir()) if f.is_file()},
            "reason": report["reason"],
            "validation": {k: m[k] for k in ("size_mb", "tokens_per_s_batch1", "tokens_per_s_batch8",
                                             "request_latency_p95_ms", "exact_match", "json_valid_rate",
                                             "perplexity", "jaccard_at_1")},
            "vs_uncompressed": m["vs_reference"]}


def _serving_card(manifest: dict) -> str:
    serving = manifest.get("serving")
    if not serving:
        return ""
    v, r = serving["validation"], serving["vs_uncompressed"]
    return (f"\n## Serving variant\n\n`serving/` holds **{serving['variant']}** ({serving['format']}), chosen by the "
            f"compress stage: {serving['reason']}.\n\n| | |\n|---|---|\n| size | {v['size_mb']} MB "
            f"({100 * r['size_ratio']:.0f}% of the merged fp32 model) |\n| tokens/s at batch 1 | "
            f"{v['tokens_per_s_batch1']} ({r['speedup_batch1']}x) |\n| exact match (validation) | {v['exact_match']} "
            f"({100 * r['exact_match_change']:+.1f} pts) |\n| top-1 agreement with the fp32 model | {v['jaccard_at_1']} |\n")


def model_card(cfg: RegisterSpec, manifest: dict, evaluation: dict, training: dict, splits: dict,
               gates: dict | None = None) -> str:
    """The version's README.md: description, data, results, usage, limitations, licence."""
    cand, base = evaluation["candidate"], evaluation["base"]
    rows = [{"metric": k, "fine-tuned": cand[k], "base model": base[k]}
            for k in (*HEADLINE, "perplexity", "latency_p50_ms", "latency_p95_ms", "generated_tokens_per_s")]
    data_rows = [{"split": s, "examples": m["examples"], "sha256": m["sha256"]} for s, m in splits.items()]
    slices = evaluation.get("slices", {}).get("candidate", {})
    slice_rows = [{"slice": f"{field}={value}", "n": m["n"], "exact match": m["exact_match"]}
                  for field, values in slices.items() for value, m in values.items()]
    weakest = min(slice_rows, key=lambda r: r["exact match"]) if slice_rows else None
    gate_section = ""
    if gates is not None:
        from components.gates import rows_for_display

        gate_section = (f"\n## Gates: {gates['status']}\n\n"
                        + markdown_table([{k: r[k] for k in ("gate", "observed", "threshold", "margin", "result")}
                                          for r in rows_for_display(gates)]) + "\n")
    return f"""# {cfg.model_name}

{cfg.description}

| | |
|---|---|
| base model | `{manifest['base_model']['name']}` (weights sha256 `{manifest['base_model']['sha256'][:16]}…`) |
| method | {manifest['method']['kind']} ({manifest['trainable_params']:,} trainable parameters) |
| trained | {training.get('steps')} steps in {training.get('minutes')} min on {training.get('device')} ({training.get('dtype')}), stopped by {training.get('stopped_by')} |
| git commit | `{manifest['git_commit']}` |
| spec sha256 | `{manifest['spec_sha256']}` |
| licence | {cfg.license} |

## Training data

Support tickets with the customer's profile as of the ticket's time (Feast point-in-time
join) and the top {manifest['prompt']['top_k']} help-center articles retrieved for the
ticket, rendered as chats; split by a hash of the ticket id.

{markdown_table(data_rows)}

## Evaluation (test split, greedy decoding)

{markdown_table(rows)}

Exact match by slice:

{markdown_table(slice_rows)}
{gate_section}
## Usage

```python
import mlflow
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = mlflow.artifacts.download_artifacts("models:/{cfg.model_name}@{cfg.alias}")
tokenizer = AutoTokenizer.from_pretrained(f"{{folder}}/adapter")
base = AutoModelForCausalLM.from_pretrained("<folder of {manifest['base_model']['name']}>", use_safetensors=True)
model = PeftModel.from_pretrained(base, f"{{folder}}/adapter").merge_and_unload()
# Build the prompt with components/features.py: online_context (same template as training),
# then generate greedily and parse the answer with components/evaluate.py: parse_answer.
```
{_serving_card(manifest)}
## Limitations and biases

- Trained on the demo's synthetic tickets (8 intents, 5 products, English plus a little
  Spanish); other products, intents or languages are out of distribution.
- Priority depends on the customer's plan and account flags by design: customers on
  higher plans get higher priority for the same text.
- Answers are only as good as the retrieved articles: when the right article is not among
  the top {manifest['prompt']['top_k']}, the article id is wrong.
- Weakest slice on the test split: {f"{weakest['slice']} (exact match {weakest['exact match']}, n={weakest['n']})" if weakest else "n/a"}.
- A {manifest['base_model']['parameters'] or 'small'}-parameter model: check JSON validity on every answer.

## Licence

{cfg.license}, as the base model.
"""


def run(cfg: RegisterSpec, io: StageIO) -> StageResult:
    """Register the fine-tuned adapter as a new version of ``model_name`` with alias ``alias``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from components.finetune import FinetuneSpec, base_model_of

    ft_cfg: FinetuneSpec = io.sections.get("finetune", FinetuneSpec())
    base_path = Path(base_model_of(io))
    adapter = io.inputs["finetune"] / "adapter"
    training = json.loads((io.inputs["finetune"] / "metrics.json").read_text())
    evaluation = json.loads((io.inputs["evaluate"] / "metrics.json").read_text())
    splits = json.loads((io.inputs["prepare"] / "splits.json").read_text())
    if evaluation.get("base_model_sha256") and evaluation.get("test_sha256") != splits["test"]["sha256"]:
        raise StageError("evaluate's metrics are for a different test split than prepare's "
                         f"({evaluation.get('test_sha256', '?')[:12]} vs {splits['test']['sha256'][:12]}); "
                         "run the evaluate stage again")
    base_sha = weights_sha256(str(base_path), io.state_dir)
    prepare_cfg, features_cfg = io.sections.get("prepare"), io.sections.get("features")
    catalog_entry = io.models.get(ft_cfg.base_model)
    manifest = {
        "format": 1,
        "base_model": {"name": ft_cfg.base_model, "sha256": base_sha,
                       "source": catalog_entry.model_dump(mode="json") if catalog_entry is not None else None,
                       "parameters": training.get("total_params")},
        "adapter_sha256": file_sha256(adapter / "adapter_model.safetensors"),
        "method": ft_cfg.method.model_dump(mode="json"),
        "trainable_params": training.get("trainable_params", 0),
        "prompt": {"system_prompt": getattr(prepare_cfg, "system_prompt", None),
                   "user_template": getattr(prepare_cfg, "user_template", None),
                   "top_k": getattr(features_cfg, "top_k", None),
                   "embedding_model": getattr(features_cfg, "embedding_model", None)},
        "data_sha256": {s: m["sha256"] for s, m in splits.items()},
        "metrics": {k: evaluation["candidate"][k] for k in TAGGED} | {
            "base_exact_match": evaluation["base"]["exact_match"]},
        "git_commit": io.context.get("git_commit", "unknown"),
        "spec_sha256": io.context.get("spec_sha256", "unknown"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    serving = io.inputs.get("compress")
    if serving is not None:
        manifest["serving"] = serving_entry(serving)
    gates_file = io.inputs["gates"] / "report.json" if "gates" in io.inputs else None
    gates = json.loads(gates_file.read_text()) if gates_file else None
    if gates is not None and gates.get("test_sha256") != splits["test"]["sha256"]:
        raise StageError("the gate report is for a different test split than prepare's; run the gates stage again")
    card = model_card(cfg, manifest, evaluation, training, splits, gates)
    package = build_package(io.out_dir / "model", adapter, manifest, card, gates_file,
                            serving / "model" if serving is not None else None)

    started = None if mlflow.active_run() else mlflow.start_run(run_name="register")
    try:
        run = mlflow.active_run()
        tracking.log_artifacts(package, "model")
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
            tags |= {"gates.status": gates["status"], "gates.failed": ",".join(gates["failed"])}
        version = client.create_model_version(cfg.model_name, source=f"{run.info.artifact_uri}/model",
                                              run_id=run.info.run_id, tags=tags, description=card)
        registry.move(client, cfg.model_name, cfg.alias, int(version.version),
                      f"registered by run {run.info.run_id}", "register")
    finally:
        if started is not None:
            mlflow.end_run()
    registration = {"model_name": cfg.model_name, "version": int(version.version), "alias": cfg.alias,
                    "source": version.source, "run_id": run.info.run_id,
                    "tracking_uri": mlflow.get_tracking_uri()}
    if gates is not None:
        registration |= {"gates_status": gates["status"], "gates_failed": gates["failed"],
                         "gates_report_sha256": file_sha256(gates_file)}
    write_json(io.out_dir / "registration.json", registration)
    gate_note = f", gates {gates['status']}" if gates is not None else ""
    summary = (f"### register\n`{cfg.model_name}` version {version.version} -> alias `{cfg.alias}`{gate_note} "
               f"(base `{ft_cfg.base_model}` sha256 {base_sha[:12]}, adapter {manifest['adapter_sha256'][:12]}).\n\n"
               + markdown_table([{"metric": k, "value": v} for k, v in manifest["metrics"].items()]))
    return StageResult(outputs={"model": package, "registration": io.out_dir / "registration.json"},
                       metrics={"version": int(version.version), **manifest["metrics"]}, summary=summary)
