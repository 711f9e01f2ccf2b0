"""The stage registry: stage name -> component function, spec section, inputs, outputs.

Adding a stage = one component module + its section in PipelineSpec (llmops/spec.py)
+ one line here + its stage in dvc.yaml (``llmops dvc generate`` writes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from components import (compress, deploy, evaluate, features, finetune, gates, ingest, prepare, promote,
                        register, validate)
from components.base import StageIO, StageResult
from components.task import AnswerSchema

METRICS_FILE = "metrics.json"  # every stage's typed report (llmops.runner writes it)
SCHEMA_FILE = AnswerSchema.FILE


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[..., StageResult]  # run(cfg, io) -> StageResult; its module's imports are its code (DVC deps)
    needs: tuple[str, ...]  # stages whose output folders this one reads
    outputs: tuple[str, ...]  # files it writes in its folder (DVC outs)
    doc: str
    # The files it reads from each input stage's folder (needs and optional; METRICS_FILE
    # included only where it reads that stage's report): its DVC deps on those stages. What it
    # does not read there (Data Docs, report.md, PNG and CSV plots) is for people and re-runs nothing.
    input_files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    extra_deps: tuple[str, ...] = ()  # files it depends on that its imports do not show (DVC deps)
    reads: tuple[str, ...] = ()  # other spec keys it reads, e.g. "prepare.split" (DVC params; the
    #                              section they sit in is passed in io.sections)
    metrics: tuple[str, ...] = ()  # report files in its folder that DVC shows as metrics
    plots: tuple[dict, ...] = ()  # {file in its folder: DVC plot properties (x, y, template)}
    optional: tuple[str, ...] = ()  # stages it also reads when the pipeline has them (e.g. compress)
    # the data files or folders its section names (e.g. ingest.extra): DVC deps, so new data reruns it
    data_deps: Callable[[Any], list[str]] | None = None

    def inputs(self, stages: list[str]) -> tuple[str, ...]:
        """The stages whose folders this one reads in a pipeline made of ``stages``."""
        return self.needs + tuple(s for s in self.optional if s in stages)


# `feast apply` (features) loads the repository's definitions and config into the registry
# that prepare's point-in-time joins and retrieval read: both depend on them.
FEAST_REPO = ("feature_repo/definitions.py", "feature_repo/feature_store.yaml")

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("ingest", ingest.run, (), ingest.OUTPUTS,
          "bring raw tickets, customers, profiles and articles into the run folder",
          data_deps=ingest.IngestSpec.local_extra),
    Stage("validate", validate.run, ("ingest",), validate.OUTPUTS,
          "Great Expectations checks; stop or quarantine before training",
          input_files={"ingest": ingest.OUTPUTS},
          reads=("task.answer", "prepare.split", "prepare.split_salt", "prepare.test_only"),
          metrics=("validation.json",)),
    Stage("features", features.run, ("validate",), features.OUTPUTS,
          "article embeddings; feast apply; materialize profiles and articles into the online store",
          input_files={"validate": ("articles.parquet", "customer_profiles.parquet", "tickets.parquet")},
          extra_deps=FEAST_REPO),
    Stage("prepare", prepare.run, ("validate", "features"), prepare.OUTPUTS,
          "Feast point-in-time features + retrieved articles -> chat examples, hashed splits, answer schema",
          # features' tables are read through the Feast store they were published to; the
          # articles table gives the article ids the answer may name
          input_files={"validate": ("articles.parquet", "tickets.parquet"), "features": features.OUTPUTS},
          extra_deps=FEAST_REPO, reads=("task", "features")),
    Stage("finetune", finetune.run, ("prepare",), finetune.OUTPUTS,
          "PEFT fine-tuning on the train split, answer-only loss, early stopping, resumable",
          input_files={"prepare": ("train.jsonl", "validation.jsonl")},
          plots=({"train_log.csv": {"x": "step", "y": "loss", "title": "training loss"}},)),
    Stage("evaluate", evaluate.run, ("prepare", "finetune"), evaluate.OUTPUTS,
          "greedy answers of the fine-tuned and the base model on the test split; metrics, slices, confusion",
          input_files={"prepare": ("test.jsonl", SCHEMA_FILE), "finetune": ("adapter",)},
          reads=("finetune.base_model",), plots=({"confusion.csv": {"template": "confusion", "x": "actual",
                                                                   "y": "predicted",
                                                                   "title": "confusion (first answer field)"}},)),
    Stage("compress", compress.run, ("prepare", "finetune"), compress.OUTPUTS,
          "merged, ONNX, int8/int4, pruned and distilled variants measured on validation; one chosen under "
          "the quality budget",
          input_files={"prepare": ("train.jsonl", "validation.jsonl", SCHEMA_FILE), "finetune": ("adapter",)},
          reads=("finetune.base_model",),
          plots=({"quality_speed.csv": {"template": "scatter", "x": "tokens_per_s_batch1", "y": "exact_match",
                                        "title": "compression: quality vs speed"}},)),
    Stage("gates", gates.run, ("prepare", "finetune", "evaluate"), gates.OUTPUTS,
          "every declared gate: absolute, vs base, vs champion, operational budgets, behaviour, safety",
          input_files={"prepare": ("test.jsonl", SCHEMA_FILE), "finetune": ("adapter",),
                       "evaluate": (METRICS_FILE,), "compress": (METRICS_FILE,)},
          reads=("task", "finetune.base_model", "evaluate", "register.model_name"), optional=("compress",)),
    Stage("register", register.run, ("prepare", "finetune", "evaluate"), register.OUTPUTS,
          "new MLflow model version (adapter + base model hash + model card + gate report + chosen compressed "
          "variant + answer schema), alias challenger",
          input_files={"prepare": (METRICS_FILE, SCHEMA_FILE, "validation.jsonl"),
                       "finetune": ("adapter", METRICS_FILE),
                       "evaluate": (METRICS_FILE,), "compress": ("model", METRICS_FILE),
                       "gates": (METRICS_FILE,)},
          reads=("task", "finetune.base_model", "finetune.method", "features.top_k", "features.embedding_model",
                 "features.feature_service"), optional=("compress", "gates")),
    Stage("promote", promote.run, ("gates", "register"), promote.OUTPUTS,
          "champion <- the new version when every gate passed (previous <- the old champion); else stop",
          input_files={"gates": (METRICS_FILE,), "register": (METRICS_FILE,)}),
    Stage("deploy", deploy.run, ("prepare", "promote"), deploy.OUTPUTS,
          "the champion goes live on the target (local endpoint, KServe, SageMaker) after its golden prompt, "
          "smoke set and (shadow/canary) live traffic pass; else the live version stays",
          input_files={"prepare": ("test.jsonl",), "promote": (METRICS_FILE,)},
          reads=("serve", "gates", "evaluate.max_new_tokens")),
)}

__all__ = ["STAGES", "Stage", "StageIO", "StageResult", "METRICS_FILE"]
