"""promote: the newly registered version becomes ``champion`` only when every gate passed.

Gates all passed: ``champion`` moves to the version ``register`` created, the champion it
replaces becomes ``previous`` (components/registry.py moves the aliases and records each
move in the audit log). Any gate failed: the version stays ``challenger``, the champion is
untouched, and the stage fails with the failing gates named (``mode: enforce``), or
succeeds having recorded the refusal (``mode: warn``).
"""
from __future__ import annotations

from typing import Literal

from components import registry, tracking
from components.base import StageError, StageIO, StageResult, StrictModel
from components.reports import GateReport, PromotionReport, RegistrationReport

OUTPUTS: tuple[str, ...] = ()


class PromoteSpec(StrictModel):
    mode: Literal["enforce", "warn"] = "enforce"  # warn: a failed gate is recorded, the run still succeeds


def run(cfg: PromoteSpec, io: StageIO) -> StageResult:
    """Move ``champion`` to the registered version if its gates passed; see the module doc."""
    import hashlib
    import json

    report = GateReport.read(io.inputs["gates"])
    reg = RegistrationReport.read(io.inputs["register"])
    name, number = reg.model_name, reg.version
    digest = hashlib.sha256(json.dumps(report.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()
    if reg.gates_sha256 != digest:
        raise StageError(f"{io.inputs['gates']}: not the gate report {name} version {number} was registered with; "
                         "run the register stage again")
    try:
        client = registry.client()
        champion = registry.aliases(client, name).get(registry.CHAMPION)
        moves = []
        if report.status == "passed":
            run_id = io.context.get("mlflow_parent_run_id") or io.context.get("mlflow_run_id")
            moves = registry.promote(client, name, number, f"all {len(report.gates)} gates passed (run {run_id})")
        outcome = ("promoted" if moves else "already champion") if report.status == "passed" else "refused"
        client.set_model_version_tag(name, str(number), "promotion", outcome)
    except registry.RegistryError as exc:
        raise StageError(str(exc)) from exc
    record = PromotionReport(model_name=name, version=number, outcome=outcome, mode=cfg.mode,
                             champion_before=champion, failed_gates=report.failed, moves=moves)
    tracking.set_tags({"promotion": outcome})
    kept = f"{name} version {number} stays challenger; champion {f'v{champion}' if champion else '(none)'} unchanged"
    if outcome == "refused" and cfg.mode == "enforce":
        record.write(io.out_dir)  # kept in promote.failed/ for a person to read
        raise StageError(f"gates failed: {'; '.join(report.failing())}. {kept}")
    summary = (f"### promote\n`{name}` version {number}: **{outcome}**"
               + (f" ({kept}; failed gates: {', '.join(report.failing())}; mode warn)" if outcome == "refused" else "")
               + "".join(f"\n- `{m['alias']}`: {m['from']} -> {m['to']} ({m['why']})" for m in moves))
    return StageResult(outputs={"promotion": io.out_dir / "metrics.json"}, report=record, summary=summary)
