"""The ``deployments`` section of a pipeline in pipelines.yaml: the scheduled Prefect
deployments (retrain, monitor, materialize), the work pools they run on, and the
drift -> retrain automation. No Prefect import here: the spec loads without it."""
from __future__ import annotations

from typing import Literal
from zoneinfo import available_timezones

from pydantic import Field, field_validator, model_validator

from components.base import StrictModel


def _cron(value: str | None) -> str | None:
    if value is None:
        return None
    from datetime import datetime

    from cronsim import CronSim, CronSimError

    try:
        CronSim(value, datetime(2026, 1, 1))
    except CronSimError as exc:
        raise ValueError(f"{value!r} is not a cron expression (minute hour day month weekday): {exc}") from None
    return value


class PoolSpec(StrictModel):
    # process: a worker on a machine with the project (`prefect worker start --pool NAME`);
    # kubernetes/docker: a worker of that type, its base job template from infra/pools/.
    type: Literal["process", "kubernetes", "docker"] = "process"
    concurrency: int | None = Field(None, ge=1)  # runs at once on the pool (one per GPU on a GPU pool); null: no limit
    base_job_template: str | None = None  # a JSON file (relative to the spec); null: Prefect's default for the type


class ScheduleSpec(StrictModel):
    enabled: bool = True  # false: the deployment exists, its schedule is paused
    cron: str | None = None  # null: no schedule (runs only when started or triggered)
    timezone: str = "UTC"  # the cron's time zone (IANA name)
    pool: str = "cpu"  # a pool of `pools`
    overrides: list[str] = []  # --set KEY=VALUE overrides for every run of it

    @field_validator("cron")
    @classmethod
    def _cron_ok(cls, value: str | None) -> str | None:
        return _cron(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value not in available_timezones():
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. UTC, Europe/Paris)")
        return value


class OnDriftSpec(StrictModel):
    """A drift alert (the monitor's `llmops.drift.detected` event) schedules a retrain run
    ``delay_minutes`` later; a person can cancel it in that window."""
    enabled: bool = True
    delay_minutes: float = Field(120.0, ge=0)  # the review window before the retrain starts
    notify: bool = True  # tell the monitor's alert channels that a retrain is scheduled, and how to cancel it


class FromTrafficSpec(StrictModel):
    """Before a retrain run ingests, `llmops data from-traffic` turns the last ``hours`` of
    feedback-labelled requests into data/traffic, which ingest then adds (ingest.extra)."""
    enabled: bool = True
    hours: float = Field(168.0, gt=0)  # the window of the request log (a week)


class RetrainSpec(ScheduleSpec):
    cron: str | None = "0 3 * * 1"  # Mondays 03:00
    on_drift: OnDriftSpec = OnDriftSpec()
    from_traffic: FromTrafficSpec = FromTrafficSpec()


class MonitorScheduleSpec(ScheduleSpec):
    cron: str | None = "0 * * * *"  # hourly


class MaterializeSpec(ScheduleSpec):
    cron: str | None = "30 2 * * *"  # daily 02:30


class DeploymentsSpec(StrictModel):
    source: str | None = None  # the project folder on the workers' machines; null: the spec's folder
    pools: dict[str, PoolSpec] = {"cpu": PoolSpec()}
    # Stages run on another pool than their pipeline's run (e.g. finetune: gpu), as a run of a
    # one-stage deployment; their inputs and outputs travel through `shared_storage`.
    stage_pools: dict[str, str] = {}
    shared_storage: str | None = Field(None, pattern=r"^s3://[^/]+")  # s3://bucket/prefix
    retrain: RetrainSpec = RetrainSpec()
    monitor: MonitorScheduleSpec = MonitorScheduleSpec()
    materialize: MaterializeSpec = MaterializeSpec()

    @model_validator(mode="after")
    def _pools_exist(self) -> "DeploymentsSpec":
        for name in ("retrain", "monitor", "materialize"):
            pool = getattr(self, name).pool
            if pool not in self.pools:
                raise ValueError(f"{name}.pool {pool!r} is not one of pools ({', '.join(self.pools) or 'none'})")
        for stage, pool in self.stage_pools.items():
            if pool not in self.pools:
                raise ValueError(f"stage_pools.{stage}: {pool!r} is not one of pools ({', '.join(self.pools)})")
        if self.stage_pools and not self.shared_storage:
            raise ValueError("stage_pools needs shared_storage (s3://bucket/prefix): a stage on another pool gets "
                             "its inputs and returns its outputs through it, not through a local path")
        return self
