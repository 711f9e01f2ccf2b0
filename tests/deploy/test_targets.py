"""The deploy stage on the kserve and sagemaker targets, end to end on a tiny registered
version: merged weights to S3 (moto's server), manifests written with no cluster (nothing
is live, so the deployed-kserve alias does not move; the decision is audited), and a
SageMaker endpoint created InService (deployed-sagemaker moves)."""
from __future__ import annotations

import boto3
import pytest
import yaml

from tests.conftest import register_run, sqlite_registry

NAME = "targets-triage"


@pytest.fixture
def stage(tiny_run, tmp_path):
    """(run(cfg) -> StageResult, registry folder): the deploy stage on version 1 of
    targets-triage, champion, in a SQLite registry of its own."""
    from components import deploy, registry
    from components.base import StageIO
    from components.evaluate import EvaluateSpec
    from components.reports import PromotionReport
    from serving.settings import ServeSpec

    work = tmp_path / "registry"
    with sqlite_registry(work):
        register_run(tiny_run, work / "register", NAME)
        registry.promote(registry.client(), NAME, 1, "the target tests' champion")
    PromotionReport(model_name=NAME, version=1, outcome="promoted", mode="enforce", champion_before=None,
                    failed_gates=[]).write(work / "promote")

    def run(cfg, s3_endpoint_url):
        io = StageIO(pipeline="t", out_dir=tmp_path / "deploy", state_dir=work / "state",
                     s3_endpoint_url=s3_endpoint_url, root=tmp_path,
                     inputs={"promote": work / "promote", "prepare": tiny_run["root"] / "prepare"},
                     sections={"serve": ServeSpec(), "gates": None, "evaluate": EvaluateSpec()})
        (tmp_path / "deploy").mkdir(exist_ok=True)
        with sqlite_registry(work):
            result = deploy.run(cfg, io)
            c = registry.client()
            return result, registry.aliases(c, NAME), registry.audit_log(c, NAME)
    return run


def test_kserve_publishes_merged_weights_and_writes_checked_manifests(stage, s3_endpoint):
    from components.deploy.settings import DeploySpec

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="models")
    cfg = DeploySpec(target="kserve", kserve={"storage_uri": "s3://models/kserve", "gpus": 0})
    result, aliases, audit = stage(cfg, s3_endpoint)
    report = result.report
    assert report.outcome == "written" and "kubectl apply -f" in report.reason
    docs = {f"{d['kind']}/{d['metadata']['name']}": d
            for d in yaml.safe_load_all((result.outputs["deployment"].parent / "kserve.yaml").read_text()) if d}
    isvc = docs[f"InferenceService/{NAME}"]
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"s3://models/kserve/{NAME}/1/"
    stored = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="models", Prefix=f"kserve/{NAME}/1/")
    names = {o["Key"].rsplit("/", 1)[-1] for o in stored["Contents"]}
    assert "model.safetensors" in names and "config.json" in names and "llmops-model.json" in names
    assert "deployed-kserve" not in aliases  # written, not live
    assert audit[-1]["alias"] == "deployed-kserve" and audit[-1]["from"] is None and "written" in audit[-1]["why"]


def test_sagemaker_creates_the_endpoint_and_the_alias_follows(stage, aws_api, monkeypatch):
    from components.deploy.settings import DeploySpec

    monkeypatch.setenv("LLMOPS_SAGEMAKER_ROLE_ARN", "arn:aws:iam::123456789012:role/llmops-sagemaker")
    boto3.client("s3").create_bucket(Bucket="llmops")
    cfg = DeploySpec(target="sagemaker", sagemaker={"image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/tgi:3",
                                                    "instance_type": "ml.g4dn.xlarge"})
    result, aliases, audit = stage(cfg, None)
    report = result.report
    assert report.outcome == "deployed" and report.numbers["sagemaker"]["action"] == "created"
    assert boto3.client("sagemaker").describe_endpoint(EndpointName=NAME)["EndpointStatus"] == "InService"
    assert aliases["deployed-sagemaker"] == 1 and audit[-1]["to"] == 1 and audit[-1]["action"] == "deploy"
    assert report.url.startswith("arn:aws:sagemaker:")


def test_a_target_that_fails_leaves_the_alias_and_says_why(stage, aws_api, monkeypatch):
    from components.base import StageError
    from components.deploy.settings import DeploySpec

    monkeypatch.delenv("LLMOPS_SAGEMAKER_ROLE_ARN", raising=False)
    cfg = DeploySpec(target="sagemaker", sagemaker={"image_uri": "x"})
    with pytest.raises(StageError, match="LLMOPS_SAGEMAKER_ROLE_ARN") as err:
        stage(cfg, None)
    assert f"{NAME} version 1 failed (sagemaker, direct)" in str(err.value)
