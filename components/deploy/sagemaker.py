"""target sagemaker: a registry version live on an Amazon SageMaker endpoint.

The version's files are packed as ``model.tar.gz`` (SageMaker unpacks it into the
container's /opt/ml/model) and uploaded to ``<s3_uri>/<name>/<version>/``; a model
``<name>-v<version>`` and a new endpoint config point at it. A missing endpoint is created;
an existing one is updated with SageMaker's deployment guardrails: a blue/green update whose
traffic moves in a canary step (strategy canary) or all at once (direct, shadow), watched by
CloudWatch alarms that roll it back (an alarm per endpoint on 5xx errors and one on p95 model
latency, both created here, plus the spec's own). The call returns when the endpoint is
InService on the new config; a failed, rolled back or late update raises StageError.

Everything goes through boto3's public API: credentials, region and endpoint URLs come from
the usual AWS environment (AWS_ACCESS_KEY_ID, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL[_S3|
_SAGEMAKER|_CLOUDWATCH], profiles), never from the spec.
"""
from __future__ import annotations

import os
import re
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from components import s3
from components.base import StageError
from components.deploy.settings import SageMakerTarget

MANIFEST = "llmops-model.json"  # serving/model.py's manifest: every version folder holds one
VARIANT = "AllTraffic"  # the endpoint's one production variant
MAX_ALARMS = 10  # AutoRollbackConfiguration.Alarms holds at most 10
POLL_S = 15.0  # between describe_endpoint calls while the endpoint settles
STOPPED = ("Failed", "UpdateRollbackFailed", "OutOfService", "Deleting")


def deploy(cfg: SageMakerTarget, *, name: str, version: int, folder: Path, strategy: str,
           progress: Callable[[str], object] = print) -> dict:
    """Put version ``version`` of model ``name`` (its files in ``folder``) live on the
    endpoint ``cfg.endpoint_name`` (default: the model's name), creating it or updating it
    blue/green (``strategy`` canary: a canary step of ``cfg.canary_percent``; direct or
    shadow: all at once), and wait until it is InService on the new config.

    Returns {"endpoint", "endpoint_arn", "model", "endpoint_config", "action" ("created" |
    "updated"), "model_data", "status", "seconds"}. Raises StageError, before anything is
    created, when the role's environment variable is unset, ``image_uri`` is empty, the
    folder holds no version, the settings cannot make a valid deployment, or the AWS APIs
    cannot be reached; after, when a call is refused or the endpoint fails, is rolled back
    or is not InService within ``cfg.wait_timeout_s``."""
    started = time.monotonic()
    role = _preflight(cfg, folder, strategy)
    endpoint = _resource_name(cfg.endpoint_name or name)
    model = _resource_name(name, f"-v{version}")
    config = _resource_name(name, f"-v{version}-{datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S%f')[:17]}")
    sm, cw = _client("sagemaker"), _client("cloudwatch")

    current = _call(f"describe endpoint {endpoint}", sm.describe_endpoint, absent="Could not find endpoint",
                    EndpointName=endpoint)
    if current and current["EndpointStatus"] != "InService":
        raise StageError(f"SageMaker endpoint {endpoint} is {current['EndpointStatus']}"
                         f"{_reason(current)}: it takes no update now; wait until it is InService "
                         "(or delete a Failed one: aws sagemaker delete-endpoint) and deploy again")
    if cfg.alarms:
        found = _call("describe the alarms of deploy.sagemaker.alarms", cw.describe_alarms,
                      AlarmNames=list(cfg.alarms), AlarmTypes=["MetricAlarm", "CompositeAlarm"])
        have = {a["AlarmName"] for a in [*found.get("MetricAlarms", []), *found.get("CompositeAlarms", [])]}
        if missing := sorted(set(cfg.alarms) - have):
            raise StageError(f"deploy.sagemaker.alarms: CloudWatch has no alarm {', '.join(missing)}")

    model_data = _upload(folder, f"{cfg.s3_uri.rstrip('/')}/{name}/{version}", progress)
    _create_model(sm, cfg, model, model_data, role, name, version, progress)
    _call(f"create endpoint config {config}", sm.create_endpoint_config, EndpointConfigName=config,
          ProductionVariants=[{"VariantName": VARIANT, "ModelName": model, "InstanceType": cfg.instance_type,
                               "InitialInstanceCount": cfg.instance_count, "InitialVariantWeight": 1.0}])
    progress(f"sagemaker: endpoint config {config} ({cfg.instance_count} x {cfg.instance_type})")
    alarms = [*put_alarms(cw, endpoint, cfg.max_p95_latency_ms), *cfg.alarms]

    if current is None:
        _call(f"create endpoint {endpoint}", sm.create_endpoint, EndpointName=endpoint, EndpointConfigName=config)
        progress(f"sagemaker: creating endpoint {endpoint}")
    else:
        _call(f"update endpoint {endpoint}", sm.update_endpoint, EndpointName=endpoint, EndpointConfigName=config,
              DeploymentConfig=deployment_config(cfg, strategy, alarms))
        step = f"canary {cfg.canary_percent}%" if strategy == "canary" else "all at once"
        progress(f"sagemaker: updating endpoint {endpoint} from {current['EndpointConfigName']} "
                 f"(blue/green, {step}, rollback alarms: {', '.join(alarms)})")
    final = _wait(sm, endpoint, config, cfg.wait_timeout_s, progress)
    return {"endpoint": endpoint, "endpoint_arn": final["EndpointArn"], "model": model, "endpoint_config": config,
            "action": "created" if current is None else "updated", "model_data": model_data,
            "status": final["EndpointStatus"], "seconds": round(time.monotonic() - started, 2)}


def deployment_config(cfg: SageMakerTarget, strategy: str, alarms: list[str]) -> dict:
    """UpdateEndpoint's DeploymentConfig: blue/green, a canary step of ``cfg.canary_percent``
    of the new fleet's capacity (strategy canary) or all traffic at once, each shift baked
    ``cfg.canary_wait_s`` and rolled back when any of ``alarms`` trips."""
    routing: dict = {"Type": "ALL_AT_ONCE", "WaitIntervalInSeconds": cfg.canary_wait_s}
    if strategy == "canary":
        routing = {"Type": "CANARY", "WaitIntervalInSeconds": cfg.canary_wait_s,
                   "CanarySize": {"Type": "CAPACITY_PERCENT", "Value": cfg.canary_percent}}
    return {"BlueGreenUpdatePolicy": {
                "TrafficRoutingConfiguration": routing,
                "TerminationWaitInSeconds": cfg.termination_wait_s,
                "MaximumExecutionTimeoutInSeconds": _execution_timeout_s(cfg)},
            "AutoRollbackConfiguration": {"Alarms": [{"AlarmName": a} for a in alarms]}}


def put_alarms(cw, endpoint: str, max_p95_latency_ms: float) -> list[str]:
    """Create (or update: put_metric_alarm replaces by name) the endpoint's two rollback
    alarms on both fleets: any 5xx in a minute, and p95 model latency over the budget for
    two minutes running. A minute without requests is not an alarm. Returns their names."""
    common = {"Namespace": "AWS/SageMaker", "Period": 60, "TreatMissingData": "notBreaching",
              "ComparisonOperator": "GreaterThanThreshold",
              "Dimensions": [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": VARIANT}]}
    errors, latency = f"{endpoint}-invocation-5xx", f"{endpoint}-model-latency-p95"
    _call(f"put alarm {errors}", cw.put_metric_alarm, AlarmName=errors, MetricName="Invocation5XXErrors",
          Statistic="Sum", Threshold=0.0, EvaluationPeriods=1, **common,
          AlarmDescription=f"rolls back an update of {endpoint} on any server error")
    _call(f"put alarm {latency}", cw.put_metric_alarm, AlarmName=latency, MetricName="ModelLatency",
          ExtendedStatistic="p95", Threshold=max_p95_latency_ms * 1000,  # ModelLatency is in microseconds
          EvaluationPeriods=2, DatapointsToAlarm=2, **common,
          AlarmDescription=f"rolls back an update of {endpoint} when p95 model latency exceeds "
                           f"{max_p95_latency_ms:g} ms")
    return [errors, latency]


def _preflight(cfg: SageMakerTarget, folder: Path, strategy: str) -> str:
    """The execution role's ARN, after every check that needs no AWS call."""
    role = os.environ.get(cfg.role_arn_env, "").strip()
    if not role:
        raise StageError(f"deploy.sagemaker: the environment variable {cfg.role_arn_env} (deploy.sagemaker."
                         "role_arn_env) is not set; set it to the ARN of the endpoint's execution role")
    if not cfg.image_uri.strip():
        raise StageError("deploy.sagemaker.image_uri is empty: set the inference container image "
                         "(e.g. the Hugging Face TGI image of your region)")
    if strategy not in ("direct", "shadow", "canary"):
        raise StageError(f"deploy.strategy {strategy!r}: the sagemaker target knows direct, shadow and canary")
    if strategy == "canary" and cfg.canary_percent > 50:
        raise StageError(f"deploy.sagemaker.canary_percent must be <= 50 (got {cfg.canary_percent}): "
                         "SageMaker's canary is at most half of the new fleet")
    if len(cfg.alarms) > MAX_ALARMS - 2:
        raise StageError(f"deploy.sagemaker.alarms holds {len(cfg.alarms)}; at most {MAX_ALARMS - 2} "
                         f"(an update takes {MAX_ALARMS} rollback alarms, 2 of them the target's own)")
    if cfg.wait_timeout_s <= cfg.canary_wait_s + cfg.termination_wait_s:
        raise StageError(f"deploy.sagemaker.wait_timeout_s ({cfg.wait_timeout_s:g}) must exceed canary_wait_s + "
                         f"termination_wait_s ({cfg.canary_wait_s + cfg.termination_wait_s}): an update bakes "
                         "and drains the old fleet within it")
    if not (folder / MANIFEST).is_file():
        raise StageError(f"{folder} holds no {MANIFEST}: not a registry version's files")
    return role


def _execution_timeout_s(cfg: SageMakerTarget) -> int:
    """The whole update's limit on SageMaker's side: our own wait, within the API's 600..28800."""
    return int(min(28800, max(600, cfg.wait_timeout_s)))


def _resource_name(base: str, suffix: str = "") -> str:
    """A SageMaker name (letters, digits and single hyphens, at most 63 characters) from a
    model name, which may hold underscores or dots; the suffix is kept whole."""
    cleaned = re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9]", "-", base)).strip("-")
    if not cleaned:
        raise StageError(f"{base!r} holds no letter or digit to name a SageMaker resource with")
    return cleaned[:63 - len(suffix)].rstrip("-") + suffix


def _client(service: str):
    """A boto3 client with standard retries and bounded waits; a missing region says so."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import NoRegionError

    try:
        return boto3.client(service, config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                   connect_timeout=5, read_timeout=60))
    except NoRegionError:
        raise StageError("no AWS region: set AWS_DEFAULT_REGION (or a profile's region) for the "
                         "sagemaker target") from None


def _call(what: str, method, absent: str | None = None, **kwargs):
    """``method(**kwargs)``; None when the API answers that it has no such thing (a message
    holding ``absent``); any other refusal or an unreachable API: StageError naming ``what``."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        return method(**kwargs)
    except NoCredentialsError:
        raise StageError(f"sagemaker target: cannot {what}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)") from None
    except (BotoCoreError, ClientError) as exc:
        if absent and isinstance(exc, ClientError) and absent in exc.response.get("Error", {}).get("Message", ""):
            return None
        raise StageError(f"sagemaker target: cannot {what}: {str(exc).splitlines()[0]}") from None


def _upload(folder: Path, uri: str, progress) -> str:
    """Pack every file of ``folder`` (paths relative to it; the fetch cache's dot-file
    markers at its top left out) as model.tar.gz under ``uri``; returns the tarball's URI."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.relative_to(folder).parts[0].startswith("."))
    with tempfile.TemporaryDirectory(prefix="llmops-sagemaker-") as tmp:
        tarball = Path(tmp) / "model.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            for path in files:
                tar.add(path, arcname=path.relative_to(folder).as_posix())
        size_kib = tarball.stat().st_size / 1024
        s3.upload_tree(Path(tmp), uri)
    size = f"{size_kib / 1024:.1f} MiB" if size_kib >= 1024 else f"{size_kib:.1f} KiB"
    progress(f"sagemaker: packed {len(files)} files ({size}) -> {uri}/model.tar.gz")
    return f"{uri}/model.tar.gz"


def _create_model(sm, cfg: SageMakerTarget, model: str, model_data: str, role: str, name: str,
                  version: int, progress) -> None:
    """Create the model; one left by an earlier deploy of this version is reused when it
    points at the same files, image and role (models cannot be changed in place)."""
    container = {"Image": cfg.image_uri, "ModelDataUrl": model_data,
                 "Environment": {"LLMOPS_MODEL_NAME": name, "LLMOPS_MODEL_VERSION": str(version)}}
    found = _call(f"describe model {model}", sm.describe_model, absent="Could not find model", ModelName=model)
    if found is None:
        _call(f"create model {model}", sm.create_model, ModelName=model, ExecutionRoleArn=role,
              PrimaryContainer=container)
        progress(f"sagemaker: model {model} ({cfg.image_uri})")
        return
    have = found.get("PrimaryContainer", {})
    held = (have.get("Image"), have.get("ModelDataUrl"), found.get("ExecutionRoleArn"))
    if held != (cfg.image_uri, model_data, role):
        raise StageError(f"SageMaker model {model} exists with another image, model data or role "
                         f"({', '.join(map(str, held))}); "
                         f"delete it (aws sagemaker delete-model --model-name {model}) to deploy this version again")
    progress(f"sagemaker: model {model} exists; reused")


def _reason(described: dict) -> str:
    return f" ({described['FailureReason']})" if described.get("FailureReason") else ""


def _wait(sm, endpoint: str, config: str, timeout_s: float, progress) -> dict:
    """Poll the endpoint until it is InService on ``config``; StageError when it stops
    (Failed, ...), comes back on another config (rolled back) or takes longer than ``timeout_s``."""
    started, last = time.monotonic(), None
    while True:
        described = _call(f"describe endpoint {endpoint}", sm.describe_endpoint, EndpointName=endpoint)
        status = described["EndpointStatus"]
        if status != last:
            progress(f"sagemaker: endpoint {endpoint} {status} ({time.monotonic() - started:.0f} s)")
            last = status
        if status == "InService" and described.get("EndpointConfigName") == config:
            return described
        if status == "InService":
            raise StageError(f"SageMaker endpoint {endpoint} is InService on {described.get('EndpointConfigName')}, "
                             f"not {config}: the update was rolled back{_reason(described)}; see its alarms")
        if status in STOPPED:
            raise StageError(f"SageMaker endpoint {endpoint} is {status}{_reason(described)}")
        if time.monotonic() - started > timeout_s:
            raise StageError(f"SageMaker endpoint {endpoint} is still {status} after {timeout_s:g} s "
                             f"(deploy.sagemaker.wait_timeout_s){_reason(described)}")
        time.sleep(POLL_S)
