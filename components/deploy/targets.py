"""targets kserve and sagemaker, as deploy stage steps: the version's merged weights go to S3
(components/deploy/kserve.py), then the manifests are written (and applied when a cluster
context is set), or the SageMaker endpoint is created or updated
(components/deploy/sagemaker.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.base import StageError, StageIO
from components.catalog import ModelError
from components.deploy.local import Attempt
from components.deploy.settings import DeploySpec


def _merged(io: StageIO, name: str, version: int, progress) -> tuple[Path, dict]:
    """(folder of the version's merged Hugging Face model, its manifest); merged once per
    version under ``<state>/deploy/merged/``."""
    from components.deploy import kserve
    from serving.model import MANIFEST, fetched

    folder, manifest = fetched(name, version, io.state_dir)
    out = io.state_dir / "deploy" / "merged" / name / str(version)
    if not (out / MANIFEST).exists() or json.loads((out / MANIFEST).read_text()) != manifest:
        progress(f"deploy: merging {name} version {version}'s adapter into its base model ...")
        try:
            kserve.merged_weights(folder, io.models, io.state_dir, out)
        except ModelError as exc:
            raise StageError(str(exc)) from None
        shutil.copy2(folder / MANIFEST, out / MANIFEST)  # what the files are, beside them
    return out, manifest


def deploy_kserve(cfg: DeploySpec, io: StageIO, name: str, attempt: Attempt, progress=print) -> None:
    """Weights to S3, manifests checked and written to the stage folder, applied when
    ``deploy.kserve.context`` names a cluster (else the kubectl command is printed)."""
    from components.deploy import kserve

    merged, manifest = _merged(io, name, attempt.version, progress)
    uri = kserve.publish(merged, cfg.kserve, name, attempt.version, io.s3_endpoint_url)
    progress(f"deploy: merged weights of {name} version {attempt.version} -> {uri}")
    try:
        docs = kserve.manifests(cfg.kserve, name=name, version=attempt.version, storage_uri=uri,
                                strategy=cfg.strategy, canary_percent=round(100 * cfg.canary.share),
                                golden=manifest.get("golden"), serve=io.sections["serve"])
        kserve.check(docs)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    path = kserve.write(docs, io.out_dir)
    attempt.numbers["kserve"] = {"manifests": str(path), "storage_uri": uri, "documents": len(docs)}
    try:
        said = kserve.apply(path, cfg.kserve)
    except RuntimeError as exc:
        raise StageError(str(exc)) from None
    if cfg.kserve.context is None:
        attempt.outcome = "written"
        attempt.reason = f"no cluster configured (deploy.kserve.context); apply with: {said}"
        progress(f"deploy: {len(docs)} manifests written to {path}; no cluster is configured, so apply them with:\n"
                 f"  {said}")
    else:
        attempt.outcome = "deployed"
        attempt.url = f"kserve://{cfg.kserve.context}/{cfg.kserve.namespace}/{name}"
        progress(f"deploy: applied to {cfg.kserve.context}: {said.strip()}")


def deploy_sagemaker(cfg: DeploySpec, io: StageIO, name: str, attempt: Attempt, progress=print) -> None:
    """The merged model (with its manifest) to S3, then the SageMaker endpoint, InService."""
    from components.deploy import sagemaker

    merged, _ = _merged(io, name, attempt.version, progress)
    record = sagemaker.deploy(cfg.sagemaker, name=name, version=attempt.version, folder=merged,
                              strategy=cfg.strategy, progress=progress)
    attempt.outcome, attempt.url = "deployed", record["endpoint_arn"]
    attempt.numbers["sagemaker"] = record
