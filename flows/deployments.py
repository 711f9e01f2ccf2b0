"""The project's Prefect deployments, declared once from pipelines.yaml (``deployments``
section of a pipeline) and registered by `llmops deployments apply`.

For a pipeline P:

- ``llmops-pipeline/P-retrain``: the whole pipeline (weekly by default); a drift alert of
  P's model (event ``llmops.drift.detected``) schedules a run of it after a review window
  in which a person can cancel it; the run's MLflow tags name the event and window.
- ``llmops-monitor/P-monitor``: drift monitoring of the served version (hourly).
- ``llmops-materialize/P-materialize``: feature materialization (daily).
- ``llmops-retrain-notice/P-retrain-notice``: started by the same drift event; tells the
  monitor's alert channels which retrain run is scheduled, when, and how to cancel it.

Work pools are created (or their settings updated) before the deployments; a process pool
gets Prefect's default job template, a kubernetes/docker pool the template file the spec
names (infra/pools/). Code is found on the worker's machine in ``deployments.source``
(default: the spec's folder), the working directory of every run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from flows.settings import ScheduleSpec
from llmops.spec import Spec

ENTRYPOINTS = {
    "retrain": ("llmops-pipeline", "flows/pipeline.py:pipeline_flow"),
    "monitor": ("llmops-monitor", "flows/monitor.py:monitor_flow"),
    "materialize": ("llmops-materialize", "flows/materialize.py:materialize_flow"),
    "retrain-notice": ("llmops-retrain-notice", "flows/notice.py:retrain_notice_flow"),
    "stage": ("llmops-stage", "flows/remote.py:stage_flow"),
}
DRIFT_EVENT = "llmops.drift.detected"
# What the retrain run is told about the drift alert that caused it (rendered by Prefect).
TRIGGER_PARAMETERS = {  # (rendered as text: a UUID or a datetime would not render as JSON)
    "event_id": "{{ event.id|string }}", "event": "{{ event.event }}", "occurred": "{{ event.occurred|string }}",
    "model": "{{ event.payload.model }}", "window_first": "{{ event.payload.window.first|string }}",
    "window_last": "{{ event.payload.window.last|string }}",
    "window_requests": "{{ event.payload.window.requests|string }}",
    "signals": "{{ event.payload.signals | map(attribute='name') | join(',') }}"}


def deployment_name(kind: str, pipeline: str, stage: str | None = None) -> str:
    """The deployment's full name, ``flow/deployment``: e.g. ``llmops-pipeline/P-retrain``,
    ``llmops-stage/P-finetune``."""
    return f"{ENTRYPOINTS[kind][0]}/{pipeline}-{stage or kind}"


@dataclass
class Declared:
    """One deployment as the spec declares it."""
    kind: str
    flow: str
    name: str
    entrypoint: str
    pool: str
    cron: str | None
    timezone: str
    active: bool
    parameters: dict
    description: str
    triggers: list = field(default_factory=list)  # Prefect DeploymentEventTrigger objects

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.name}"


def source_folder(spec: Spec, root: Path, pipeline: str) -> str:
    source = spec.pipelines[pipeline].deployments.source
    return str(Path(source) if source and Path(source).is_absolute() else (root / (source or ".")).resolve())


def declare(spec: Spec, root: Path, spec_file: Path, pipeline: str) -> list[Declared]:
    """The deployments of ``pipeline``: retrain, monitor, materialize and the retrain notice."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    pipe = spec.pipelines[pipeline]
    cfg = pipe.deployments
    model = pipe.register_.model_name
    source, spec_path = Path(source_folder(spec, root, pipeline)), spec_file.resolve()
    # runs start in `source`: the spec relative to it when it lives there (the same on every machine)
    base = {"spec_file": str(spec_path.relative_to(source) if spec_path.is_relative_to(source) else spec_path),
            "pipeline": pipeline}
    match = {"prefect.resource.id": "llmops.model.*", "llmops.pipeline": pipeline}  # whichever version it serves

    def one(kind: str, sched, parameters: dict, description: str, triggers=()) -> Declared:
        flow, entrypoint = ENTRYPOINTS[kind]
        return Declared(kind, flow, f"{pipeline}-{kind}", entrypoint, sched.pool, sched.cron, sched.timezone,
                        sched.enabled, parameters, description, list(triggers))

    drift = cfg.retrain.on_drift
    traffic = cfg.retrain.from_traffic
    retrain = {**base, "overrides": list(cfg.retrain.overrides),
               "from_traffic_hours": traffic.hours if traffic.enabled else None}
    retrain_trigger = DeploymentEventTrigger(
        name=f"{pipeline}: drift -> retrain", enabled=drift.enabled, expect={DRIFT_EVENT}, match=match,
        schedule_after=timedelta(minutes=drift.delay_minutes), parameters={**retrain, "trigger": TRIGGER_PARAMETERS})
    notice_trigger = DeploymentEventTrigger(
        name=f"{pipeline}: drift -> retrain notice", enabled=drift.enabled and drift.notify, expect={DRIFT_EVENT},
        match=match, parameters={**base, "event_id": "{{ event.id|string }}"})
    unscheduled = ScheduleSpec(cron=None, pool=cfg.retrain.pool)
    stages = []
    for stage, pool in cfg.stage_pools.items():
        if stage not in pipe.stages:
            raise ValueError(f"deployments.stage_pools: {stage!r} is not a stage of {pipeline} "
                             f"({', '.join(pipe.stages)})")
        flow, entrypoint = ENTRYPOINTS["stage"]
        stages.append(Declared("stage", flow, f"{pipeline}-{stage}", entrypoint, pool, None, "UTC", True,
                               {**base, "stage": stage},
                               f"The {stage} stage of {pipeline} on work pool {pool} (run by the pipeline flow)."))
    return stages + [
        one("retrain", cfg.retrain, retrain,
            f"The {pipeline} pipeline end to end: retraining; a drift alert schedules a run "
            f"{drift.delay_minutes:g} min later (cancel it to skip).", [retrain_trigger]),
        one("monitor", cfg.monitor, {**base, "overrides": list(cfg.monitor.overrides)},
            f"Drift monitoring of {model}'s served version (llmops monitor)."),
        one("materialize", cfg.materialize, {**base, "overrides": list(cfg.materialize.overrides)},
            f"Feature materialization of {pipeline} into the online store."),
        one("retrain-notice", unscheduled, base,
            f"Tells {pipeline}'s alert channels which retrain run a drift alert scheduled.", [notice_trigger]),
    ]


def ensure_pools(spec: Spec, root: Path, pipeline: str, say=print) -> None:
    """Create the pipeline's work pools, or bring an existing one's template and limit to the spec."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        for name, pool in spec.pipelines[pipeline].deployments.pools.items():
            if pool.base_job_template:
                path = Path(pool.base_job_template)
                template = json.loads((path if path.is_absolute() else root / path).read_text())
            else:
                template = ProcessWorker.get_default_base_job_template()
            try:
                existing = client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool.type, base_job_template=template,
                                                             concurrency_limit=pool.concurrency))
                say(f"work pool {name} ({pool.type}) created" + (f", {pool.concurrency} run(s) at once"
                                                                 if pool.concurrency else ""))
                continue
            if existing.type != pool.type:
                raise ValueError(f"work pool {name} exists with type {existing.type}, the spec says {pool.type}: "
                                 f"delete it (`prefect work-pool delete {name}`) or rename the pool in the spec")
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template,
                                                               concurrency_limit=pool.concurrency))
            say(f"work pool {name} ({pool.type}) up to date")


def apply(spec: Spec, root: Path, spec_file: Path, pipeline: str, say=print) -> list[tuple[Declared, str]]:
    """Register the pools and deployments on the Prefect server in PREFECT_API_URL; returns
    (declared, deployment id) pairs."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron

    source = source_folder(spec, root, pipeline)
    missing = [e.split(":")[0] for _, e in ENTRYPOINTS.values() if not (Path(source) / e.split(":")[0]).is_file()]
    if missing:
        raise ValueError(f"deployments.source: {source} does not hold the project's code ({', '.join(missing)} "
                         "missing): point it at the project folder on the workers' machine")
    ensure_pools(spec, root, pipeline, say)
    applied = []
    for d in declare(spec, root, spec_file, pipeline):
        schedules = [Cron(d.cron, timezone=d.timezone, active=d.active)] if d.cron else []
        deployment = RunnerDeployment.from_storage(
            LocalStorage(path=source), d.entrypoint, d.name, schedules=schedules, parameters=d.parameters,
            triggers=d.triggers, description=d.description, tags=["llmops", pipeline, d.kind],
            work_pool_name=d.pool)
        deployment_id = deployment.apply(work_pool_name=d.pool)
        applied.append((d, str(deployment_id)))
    return applied


def server_view(pipeline: str) -> list[dict]:
    """The pipeline's deployments as the server has them: pool, schedules, the automations
    that start them, the next scheduled and the last finished run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, DeploymentFilterTags,
                                                FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    rows = []
    with get_client(sync_client=True) as client:
        automations = client.read_automations()
        found = client.read_deployments(deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=["llmops", pipeline])))
        for dep in sorted(found, key=lambda d: d.name):
            only = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))

            def first(states, sort):
                runs = client.read_flow_runs(deployment_filter=only, sort=sort, limit=1, flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))))
                return runs[0] if runs else None

            upcoming = first([StateType.SCHEDULED], FlowRunSort.EXPECTED_START_TIME_ASC)
            last = first([StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED],
                         FlowRunSort.END_TIME_DESC)
            schedules = "; ".join(f"{s.schedule.cron} {s.schedule.timezone or 'UTC'}" + ("" if s.active else " (paused)")
                                  for s in dep.schedules if getattr(s.schedule, "cron", None)) or "-"
            triggers = "; ".join(
                f"{a.name}" + ("" if a.enabled else " (off)") for a in automations
                if any(getattr(x, "deployment_id", None) == dep.id for x in a.actions)) or "-"
            rows.append({"name": f"{_flow_name(client, dep.flow_id)}/{dep.name}", "pool": dep.work_pool_name,
                         "schedule": schedules, "triggers": triggers,
                         "next": f"{upcoming.expected_start_time:%Y-%m-%d %H:%M %Z}" if upcoming else "-",
                         "last": (f"{last.state_name} {last.end_time:%Y-%m-%d %H:%M}" if last and last.end_time
                                  else (last.state_name if last else "-"))})
    return rows


def _flow_name(client, flow_id) -> str:
    return client.read_flow(flow_id).name
