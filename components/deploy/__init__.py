"""deploy: the champion goes live on the spec's target, or the version live there stays.

``target: local`` (components/deploy/local.py): the endpoint of `llmops serve` loads the
champion beside the version it serves, checks it (golden prompt, smoke set; with
``strategy`` shadow or canary, live traffic too) and switches only when every check passed.
``kserve`` writes the InferenceService and gateway manifests (components/deploy/kserve.py);
``sagemaker`` creates or updates the SageMaker endpoint (components/deploy/sagemaker.py).

The registry's ``deployed-<target>`` alias moves to the version once it is live there, in
the audit log like every alias move; a refused or rolled-back attempt is recorded there too,
with its numbers. Each attempt is also appended to ``<state>/deploy/<pipeline>.jsonl``
(`llmops deploy status`).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from components import registry
from components.base import StageError, StageIO, StageResult
from components.deploy.local import Attempt
from components.deploy.settings import DeploySpec
from components.reports import DeployReport, PromotionReport

OUTPUTS: tuple[str, ...] = ()


def attempts_path(state_dir: Path, pipeline: str) -> Path:
    return state_dir / "deploy" / f"{pipeline}.jsonl"


def run(cfg: DeploySpec, io: StageIO) -> StageResult:
    """Put the registry's champion live on ``cfg.target``; see the module doc."""
    started = time.perf_counter()
    name = PromotionReport.read(io.inputs["promote"]).model_name
    try:
        client = registry.client()
        current = registry.aliases(client, name)
    except registry.RegistryError as exc:
        raise StageError(str(exc)) from exc
    if registry.CHAMPION not in current:
        raise StageError(f"{name} has no champion to deploy (promote a version first: llmops promote)")
    number, alias = current[registry.CHAMPION], registry.deployed_alias(cfg.target)
    attempt = Attempt(number, cfg.target, cfg.strategy, previous=current.get(alias))
    try:
        if cfg.target == "local":
            from components.deploy.rollout import deploy_local

            deploy_local(cfg, io, name, attempt)
        elif cfg.target == "kserve":
            from components.deploy.targets import deploy_kserve

            deploy_kserve(cfg, io, name, attempt)
        else:
            from components.deploy.targets import deploy_sagemaker

            deploy_sagemaker(cfg, io, name, attempt)
    except StageError as exc:
        attempt.reason = attempt.reason or str(exc)
    moves = finish(client, name, alias, attempt, io)
    report = DeployReport(model_name=name, version=number, target=cfg.target, strategy=cfg.strategy,
                          outcome=attempt.outcome, reason=attempt.reason, previous=attempt.previous, url=attempt.url,
                          started_endpoint=attempt.started_endpoint,
                          checks=attempt.checks, numbers=attempt.numbers,
                          moves=moves, seconds=round(time.perf_counter() - started, 1))
    if attempt.outcome in ("refused", "rolled back", "failed"):
        report.write(io.out_dir)  # kept in deploy.failed/ for a person to read
        live = f"version {attempt.previous} stays live" if attempt.previous else "nothing is live there"
        raise StageError(f"{name} version {number} {attempt.outcome} ({cfg.target}, {cfg.strategy}): "
                         f"{attempt.reason}. {live}")
    where = f" at {attempt.url}" if attempt.url else (f" ({attempt.reason})" if attempt.reason else "")
    summary = (f"### deploy\n`{name}` version {number} **{attempt.outcome}** on {cfg.target}{where} "
               f"({cfg.strategy})"
               + "".join(f"\n- {c.line()}" for c in attempt.checks))
    return StageResult(outputs={"deployment": io.out_dir / "metrics.json"}, report=report, summary=summary)


def finish(client, name: str, alias: str, attempt: Attempt, io: StageIO) -> list[dict]:
    """Move ``deployed-<target>`` when the version went live; record every decision in the
    audit log and the attempts file."""
    failed = "; ".join(c.line() for c in attempt.failed())
    moves = []
    try:
        if attempt.outcome in ("deployed", "already live"):
            why = (f"{attempt.outcome} ({attempt.strategy})" + (f" at {attempt.url}" if attempt.url else "")
                   + ("; " + "; ".join(c.line() for c in attempt.checks) if attempt.checks else ""))
            if registry.aliases(client, name).get(alias) != attempt.version:
                moves.append(registry.move(client, name, alias, attempt.version, why, "deploy"))
        else:
            registry.record(client, name, alias, f"version {attempt.version} {attempt.outcome} "
                                                 f"({attempt.strategy}): {attempt.reason}"
                            + (f"; {failed}" if failed and failed not in (attempt.reason or "") else ""), "deploy")
    except registry.RegistryError as exc:
        attempt.reason = (attempt.reason or "") + f"; the registry was not updated: {exc}"
    path = attempts_path(io.state_dir, io.pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": name,
                             "version": attempt.version, "target": attempt.target, "strategy": attempt.strategy,
                             "outcome": attempt.outcome, "reason": attempt.reason, "previous": attempt.previous,
                             "url": attempt.url, "by": registry.actor(),
                             "run": io.context.get("mlflow_parent_run_id") or io.context.get("mlflow_run_id"),
                             "checks": [c.line() for c in attempt.checks]}) + "\n")
    return moves

