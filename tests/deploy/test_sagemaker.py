"""target sagemaker against a local AWS API (moto's server, with UpdateEndpoint added by
tests/deploy/conftest.py): first deploy, blue/green update, rollback, and the errors that
must come before anything is created."""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import boto3
import pytest

from components.base import StageError
from components.deploy.sagemaker import deploy
from components.deploy.settings import SageMakerTarget
from tests.conftest import free_port

ROLE = "arn:aws:iam::123456789012:role/llmops-sagemaker"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-tgi-inference:2.4-tgi3.0-gpu"
# moto checks instance types against an older list than SageMaker's (no ml.g5.*)
CFG = SageMakerTarget(image_uri=IMAGE, s3_uri="s3://models/sagemaker", instance_type="ml.g4dn.xlarge")


def version_folder(root: Path, version: int) -> Path:
    """A version's files as serving/model.py's fetch leaves them: the manifest, an adapter
    file, and the fetch cache's marker (which is no part of the version)."""
    folder = root / f"v{version}"
    (folder / "adapter").mkdir(parents=True)
    (folder / "llmops-model.json").write_text(json.dumps({"version": version, "adapter_sha256": "ab" * 32}))
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "version": version}))
    (folder / ".llmops-source").write_text("s3://registry/1/artifacts")
    return folder


@pytest.fixture
def aws(aws_api, monkeypatch):
    """boto3 clients on the local API, its bucket made, the role's variable set."""
    monkeypatch.setenv("LLMOPS_SAGEMAKER_ROLE_ARN", ROLE)
    clients = {name: boto3.client(name) for name in ("s3", "sagemaker", "cloudwatch")}
    clients["s3"].create_bucket(Bucket="models")
    return clients


def test_first_deploy_creates_the_endpoint(aws, tmp_path):
    lines = []
    record = deploy(CFG, name="support-triage", version=1, folder=version_folder(tmp_path, 1),
                    strategy="canary", progress=lines.append)

    sm = aws["sagemaker"]
    endpoint = sm.describe_endpoint(EndpointName="support-triage")
    assert (endpoint["EndpointStatus"], endpoint["EndpointConfigName"]) == ("InService", record["endpoint_config"])
    assert record["action"] == "created" and record["endpoint_arn"] == endpoint["EndpointArn"]
    assert record["endpoint_config"].startswith("support-triage-v1-") and record["status"] == "InService"
    variant = sm.describe_endpoint_config(EndpointConfigName=record["endpoint_config"])["ProductionVariants"][0]
    assert (variant["ModelName"], variant["InstanceType"], variant["InitialInstanceCount"]) == \
        ("support-triage-v1", "ml.g4dn.xlarge", 1)
    model = sm.describe_model(ModelName="support-triage-v1")
    assert model["ExecutionRoleArn"] == ROLE
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == record["model_data"] == \
        "s3://models/sagemaker/support-triage/1/model.tar.gz"
    assert model["PrimaryContainer"]["Environment"]["LLMOPS_MODEL_VERSION"] == "1"

    body = aws["s3"].get_object(Bucket="models", Key="sagemaker/support-triage/1/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        packed = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    folder = tmp_path / "v1"
    assert packed == {"llmops-model.json": (folder / "llmops-model.json").read_bytes(),
                      "adapter/adapter_config.json": (folder / "adapter" / "adapter_config.json").read_bytes()}

    alarms = {a["AlarmName"]: a for a in aws["cloudwatch"].describe_alarms()["MetricAlarms"]}
    assert alarms["support-triage-invocation-5xx"]["MetricName"] == "Invocation5XXErrors"
    assert alarms["support-triage-invocation-5xx"]["Threshold"] == 0
    latency = alarms["support-triage-model-latency-p95"]
    assert (latency["ExtendedStatistic"], latency["Threshold"]) == ("p95", 2_000_000)  # 2000 ms in microseconds
    assert any("creating endpoint support-triage" in line for line in lines), lines


@pytest.mark.parametrize("strategy, routing", [
    ("canary", {"Type": "CANARY", "WaitIntervalInSeconds": 120,
                "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": 20}}),
    ("direct", {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": 120}),
])
def test_next_version_updates_blue_green_with_rollback_alarms(aws, tmp_path, strategy, routing):
    aws["cloudwatch"].put_metric_alarm(
        AlarmName="team-invalid-answers", Namespace="LLMOps", MetricName="InvalidAnswers", Statistic="Sum",
        Period=60, EvaluationPeriods=1, Threshold=5, ComparisonOperator="GreaterThanThreshold")
    cfg = CFG.model_copy(update={"canary_percent": 20, "canary_wait_s": 120, "termination_wait_s": 60,
                                 "alarms": ["team-invalid-answers"]})
    first = deploy(cfg, name="support-triage", version=1, folder=version_folder(tmp_path, 1), strategy=strategy)
    second = deploy(cfg, name="support-triage", version=2, folder=version_folder(tmp_path, 2), strategy=strategy)

    assert (first["action"], second["action"]) == ("created", "updated")
    sm = aws["sagemaker"]
    endpoint = sm.describe_endpoint(EndpointName="support-triage")
    assert endpoint["EndpointStatus"] == "InService"
    assert endpoint["EndpointConfigName"] == second["endpoint_config"] != first["endpoint_config"]
    config = sm.describe_endpoint_config(EndpointConfigName=endpoint["EndpointConfigName"])
    assert config["ProductionVariants"][0]["ModelName"] == "support-triage-v2"
    assert endpoint["LastDeploymentConfig"] == {
        "BlueGreenUpdatePolicy": {"TrafficRoutingConfiguration": routing, "TerminationWaitInSeconds": 60,
                                  "MaximumExecutionTimeoutInSeconds": 1800},
        "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": "support-triage-invocation-5xx"},
                                                 {"AlarmName": "support-triage-model-latency-p95"},
                                                 {"AlarmName": "team-invalid-answers"}]}}


def test_an_update_rolled_back_by_an_alarm_fails(aws, tmp_path):
    cw = aws["cloudwatch"]
    cw.put_metric_alarm(AlarmName="team-errors", Namespace="LLMOps", MetricName="Errors", Statistic="Sum",
                        Period=60, EvaluationPeriods=1, Threshold=0, ComparisonOperator="GreaterThanThreshold")
    cfg = CFG.model_copy(update={"alarms": ["team-errors"]})
    first = deploy(cfg, name="support-triage", version=1, folder=version_folder(tmp_path, 1), strategy="canary")
    cw.set_alarm_state(AlarmName="team-errors", StateValue="ALARM", StateReason="errors during the canary")

    with pytest.raises(StageError, match=r"support-triage is InService on support-triage-v1-\d+, not "
                                         r"support-triage-v2-\d+: the update was rolled back"):
        deploy(cfg, name="support-triage", version=2, folder=version_folder(tmp_path, 2), strategy="canary")
    assert aws["sagemaker"].describe_endpoint(EndpointName="support-triage")["EndpointConfigName"] == \
        first["endpoint_config"]


@pytest.mark.parametrize("missing, message", [
    ("role", "the environment variable LLMOPS_SAGEMAKER_ROLE_ARN .* is not set"),
    ("image", "deploy.sagemaker.image_uri is empty"),
    ("alarm", "deploy.sagemaker.alarms: CloudWatch has no alarm nobody-made-this"),
])
def test_missing_role_image_or_alarm_fails_before_anything_is_created(aws, tmp_path, monkeypatch, missing,
                                                                       message):
    cfg = CFG
    if missing == "role":
        monkeypatch.delenv("LLMOPS_SAGEMAKER_ROLE_ARN")
    elif missing == "image":
        cfg = CFG.model_copy(update={"image_uri": " "})
    else:
        cfg = CFG.model_copy(update={"alarms": ["nobody-made-this"]})
    with pytest.raises(StageError, match=message):
        deploy(cfg, name="support-triage", version=1, folder=version_folder(tmp_path, 1), strategy="direct")
    assert aws["s3"].list_objects_v2(Bucket="models")["KeyCount"] == 0
    assert aws["sagemaker"].list_models()["Models"] == []
    assert aws["sagemaker"].list_endpoint_configs()["EndpointConfigs"] == []
    assert aws["sagemaker"].list_endpoints()["Endpoints"] == []
    assert aws["cloudwatch"].describe_alarms()["MetricAlarms"] == []


def test_redeploying_a_version_reuses_its_model_and_refuses_a_changed_one(aws, tmp_path):
    folder = version_folder(tmp_path, 1)
    first = deploy(CFG, name="support-triage", version=1, folder=folder, strategy="direct")
    lines = []
    again = deploy(CFG, name="support-triage", version=1, folder=folder, strategy="direct", progress=lines.append)
    assert (again["action"], again["model"]) == ("updated", first["model"])
    assert again["endpoint_config"] != first["endpoint_config"]
    assert "sagemaker: model support-triage-v1 exists; reused" in lines

    other = CFG.model_copy(update={"image_uri": IMAGE.replace("gpu", "cpu")})
    with pytest.raises(StageError, match="model support-triage-v1 exists with another image.*delete-model"):
        deploy(other, name="support-triage", version=1, folder=folder, strategy="direct")


def test_unreachable_api_fails_naming_it(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for key, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "LLMOPS_SAGEMAKER_ROLE_ARN": ROLE}.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(StageError, match=f"cannot describe endpoint support-triage: .*{url}"):
        deploy(CFG, name="support-triage", version=1, folder=version_folder(tmp_path, 1), strategy="direct")
    assert time.monotonic() - started < 30
