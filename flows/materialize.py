"""Feature materialization as a Prefect flow (what `llmops features materialize` does): the
feature values added since the last run are loaded into the online store, through the
feature server when one runs for the state folder (the one process that may open a Milvus
Lite store), else in this process."""
from __future__ import annotations

import time

from prefect import flow, get_run_logger

from components import featurestore
from llmops.runner import flow_setup


@flow(name="llmops-materialize", flow_run_name="materialize-{pipeline}")
def materialize_flow(spec_file: str = "pipelines.yaml", pipeline: str | None = None,
                     overrides: list[str] | None = None) -> dict:
    """Materialize ``pipeline``'s feature views up to now; returns {"where", "seconds"}."""
    spec, name, root = flow_setup(spec_file, list(overrides or []), pipeline)
    started = time.perf_counter()
    where = featurestore.materialize_until_now((root / spec.services.feast.repo).resolve(), spec.state_dir(root), name)
    seconds = round(time.perf_counter() - started, 1)
    get_run_logger().info("materialized %s up to now (%s) in %.1f s", name, where, seconds)
    return {"where": where, "seconds": seconds}
