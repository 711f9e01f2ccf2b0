"""pipelines.yaml: schema, loading, ``${ENV:-default}`` interpolation, ``--set`` overrides.

Errors name the file, the line, the key path and what was expected, e.g.
``pipelines.yaml:47: pipelines.support-triage.prepare.split.train: must be < 1 (got 1.5)``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from components.base import StrictModel
from components.catalog import ModelSource
from components.compress import CompressSpec
from components.deploy.settings import DeploySpec
from components.evaluate import EvaluateSpec
from components.featurestore import FeaturesSpec
from components.finetune import FinetuneSpec
from components.gates import GatesSpec
from components.ingest import IngestSpec
from components.monitor.settings import MonitorSpec
from flows.settings import DeploymentsSpec
from components.prepare import PrepareSpec
from components.promote import PromoteSpec
from components.register import RegisterSpec
from components.task import TaskSpec
from components.validate import ValidateSpec
from llmops.spec_errors import format_errors
from llmops.stages import STAGES
from serving.settings import ServeSpec

DEFAULT_SPEC = "pipelines.yaml"


class SpecError(ValueError):
    """pipelines.yaml (or an override) is invalid; ``str()`` is the message for the user."""


# ---------------------------------------------------------------- schema

class PrefectService(StrictModel):
    api_url: str | None = None  # None/empty: an ephemeral server on SQLite in the state folder


class MlflowService(StrictModel):
    tracking_uri: str | None = None  # None: sqlite:///<state_dir>/mlflow/mlflow.db


class StorageService(StrictModel):
    state_dir: str = ".llmops"
    artifacts_dir: str = "artifacts"
    s3_endpoint_url: str | None = None


class FeastService(StrictModel):
    repo: str = "feature_repo"
    url: str | None = None  # a Feast feature server every process uses (null: the local one, if running)


class Services(StrictModel):
    prefect: PrefectService = PrefectService()
    mlflow: MlflowService = MlflowService()
    storage: StorageService = StorageService()
    feast: FeastService = FeastService()


class PipelineSpec(StrictModel):
    description: str = ""
    stages: list[str] = Field(min_length=1)
    retries: dict[str, Annotated[int, Field(ge=0)]] = {}
    retry_delay_s: float = Field(10.0, ge=0)
    task: TaskSpec = TaskSpec()
    ingest: IngestSpec = IngestSpec()
    validate_: ValidateSpec = Field(ValidateSpec(), alias="validate")  # `validate` is taken by pydantic
    features: FeaturesSpec = FeaturesSpec()
    prepare: PrepareSpec = PrepareSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    compress: CompressSpec = CompressSpec()
    gates: GatesSpec = GatesSpec()
    register_: RegisterSpec = Field(RegisterSpec(), alias="register")  # `register` is taken (ABC)
    promote: PromoteSpec = PromoteSpec()
    deploy: DeploySpec = DeploySpec()
    serve: ServeSpec = ServeSpec()  # the endpoint (llmops serve); not a stage
    monitor: MonitorSpec = MonitorSpec()  # drift monitoring of the endpoint's traffic (llmops monitor)
    deployments: DeploymentsSpec = DeploymentsSpec()  # scheduled Prefect deployments (llmops deployments)

    model_config = {**StrictModel.model_config, "populate_by_name": True}

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        for name in stages:
            if name not in STAGES:
                raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
        dupes = sorted({s for s in stages if stages.count(s) > 1})
        if dupes:
            raise ValueError(f"stage(s) listed twice: {', '.join(dupes)}")
        for i, name in enumerate(stages):
            missing = [n for n in STAGES[name].needs if n not in stages[:i]]
            if missing:
                raise ValueError(f"stage {name!r} needs {', '.join(missing)} before it")
            late = [n for n in STAGES[name].optional if n in stages[i:]]
            if late:
                raise ValueError(f"stage {name!r} reads {', '.join(late)} when the pipeline has it, so it must "
                                 "come before")
        return stages

    @field_validator("retries")
    @classmethod
    def _retries_name_stages(cls, retries: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        if "stages" not in info.data:
            return retries  # the stages failed their own check; that error says it
        stages = info.data["stages"]
        unknown = [name for name in retries if name not in stages]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} not a stage of this pipeline "
                             f"(stages: {', '.join(stages)})")
        return retries

    @model_validator(mode="after")
    def _gates_name_known_metrics(self) -> "PipelineSpec":
        """A gate's metric or answer field must exist for this task: a typo fails here, not
        after training."""
        fields = list(self.task.answer)
        quality = ["exact_match", "json_valid_rate", "perplexity", *(f"{f}_accuracy" for f in fields)]
        measured = [*quality, "latency_p50_ms", "latency_p95_ms", "generated_tokens_per_s"]
        problems = []
        for name, gate in self.gates.checks.items():
            allowed = {"absolute": measured, "vs_base": quality, "vs_champion": quality}.get(gate.kind)
            if allowed and gate.metric not in allowed:
                problems.append(f"gates.checks.{name}.metric: {gate.metric!r} is not a metric of this task "
                                f"(metrics: {', '.join(allowed)})")
            sliced = (getattr(gate, "slice", None) or "").partition("=")[0]
            if sliced and sliced not in self.prepare.slice_by:
                problems.append(f"gates.checks.{name}.slice: {sliced!r} is not a field of prepare.slice_by "
                                f"({', '.join(self.prepare.slice_by) or 'none'}): evaluate has no such slice")
            answer_field = getattr(gate, "field", None)
            if answer_field is not None and answer_field not in fields:
                problems.append(f"gates.checks.{name}.field: {answer_field!r} is not an answer field "
                                f"(task.answer: {', '.join(fields)})")
            for i, case in enumerate(getattr(gate, "cases", [])):
                unknown = sorted(set(case.expect) - set(fields))
                if unknown:
                    problems.append(f"gates.checks.{name}.cases[{i}].expect: names {', '.join(unknown)}, not answer "
                                    f"fields (task.answer: {', '.join(fields)})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def section(self, stage: str) -> BaseModel:
        """The config section of ``stage`` (field names may carry a trailing _ for aliases)."""
        return getattr(self, stage if stage in type(self).model_fields else f"{stage}_")


class Spec(StrictModel):
    version: Literal[1] = 1
    default_pipeline: str
    services: Services = Services()
    models: dict[str, ModelSource] = {}
    pipelines: dict[str, PipelineSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_exists(self) -> "Spec":
        if self.default_pipeline not in self.pipelines:
            raise ValueError(f"default_pipeline {self.default_pipeline!r} is not one of the pipelines "
                             f"({', '.join(self.pipelines)})")
        return self

    def pipeline(self, name: str | None) -> tuple[str, PipelineSpec]:
        name = name or self.default_pipeline
        if name not in self.pipelines:
            raise SpecError(f"no pipeline named {name!r}; pipelines: {', '.join(self.pipelines)}")
        return name, self.pipelines[name]

    def state_dir(self, root: Path) -> Path:
        return (root / self.services.storage.state_dir).resolve()

    def artifacts_dir(self, root: Path) -> Path:
        return (root / self.services.storage.artifacts_dir).resolve()


# ---------------------------------------------------------------- loading

_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, path: str = "", env: dict[str, str] | None = None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string; ``$$`` is a literal ``$``.
    A string that is exactly one reference and resolves to "" becomes None (unset)."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {k: interpolate(v, f"{path}.{k}" if path else str(k), env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if env.get(name):
            return env[name]
        if default is None:
            raise SpecError(f"{path}: environment variable {name} is not set and has no default "
                            f"(write ${{{name}:-default}})")
        return default

    out = _ENV.sub(sub, value)
    whole = _ENV.fullmatch(value)
    return None if whole and whole.group(0) != "$$" and out == "" else out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set prepare.split.train=0.7")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str], pipeline: str | None) -> tuple[dict, set[str]]:
    """Apply ``--set`` items. A key starting with a top-level key (``services...``) is absolute;
    otherwise it is relative to the selected pipeline (``prepare.split.train=0.7``)."""
    top = set(Spec.model_fields)
    touched = set()
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] not in top:
            name = pipeline or raw.get("default_pipeline")
            if not name:
                raise SpecError(f"--set {item!r}: no pipeline selected and no default_pipeline in the spec")
            keys = ["pipelines", name, *keys]
        node = raw
        for k in keys[:-1]:
            if not isinstance(node.get(k, {}), dict):
                raise SpecError(f"--set {item!r}: {k} is not a mapping")
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        touched.add(".".join(keys))
    return raw, touched


def load_spec(path: str | Path = DEFAULT_SPEC, overrides: list[str] | None = None,
              pipeline: str | None = None, env: dict[str, str] | None = None) -> Spec:
    """Read, interpolate, override and validate a spec. Raises SpecError with a message that
    names the file, line and key path of every problem."""
    path = Path(path)
    label = path.name if path.parent == Path(".") else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{label}: file not found") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{label}: not valid UTF-8 ({exc.reason})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{label}{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{label}: expected a mapping at the top (version, services, models, pipelines)")
    try:
        raw = interpolate(raw, env=env)
    except SpecError as exc:
        raise SpecError(f"{label}: {exc}") from None
    raw, touched = apply_overrides(raw, list(overrides or []), pipeline)
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(format_errors(exc, raw, text, label, touched, Spec)) from None
    spec.pipeline(pipeline)  # an unknown -p fails here, with the list of pipelines
    return spec


def json_schema() -> dict:
    """JSON Schema of pipelines.yaml, for editors (yaml-language-server)."""
    return Spec.model_json_schema()


def dump(spec: Spec) -> str:
    """The resolved spec as YAML (defaults filled in, env and overrides applied)."""
    return yaml.safe_dump(spec.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True)
