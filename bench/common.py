"""What the benchmarks share: the base model they measure, or a clear exit when it is not
provisioned yet."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def base_model_or_exit(spec, pipe) -> str:
    """The folder of ``finetune.base_model``; exits 2 with what to run when it is missing."""
    from components.catalog import ModelError, resolve

    try:
        return resolve(pipe.finetune.base_model, spec.models, spec.state_dir(ROOT))
    except ModelError as exc:
        print(f"finetune.base_model: {exc}\n(`make models` provisions it)", file=sys.stderr)
        sys.exit(2)


def triage_or_exit(spec, root: Path, name: str, pipe, served):
    """The served version's Triage (serving/triage.py) over the project's stores, the feature
    server started when none runs (stop it with components.featureserver.stop when
    ``started_server``); exits with the reason when it cannot open."""
    from serving.triage import open_triage

    triage = open_triage(served.manifest, pipe.features, (root / spec.services.feast.repo).resolve(),
                         spec.state_dir(root), name, spec.models, start_server=True)
    if triage.problem:
        sys.exit(f"triage: {triage.problem}")
    return triage
