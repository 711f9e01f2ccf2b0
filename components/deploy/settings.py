"""The ``deploy`` section of a pipeline in pipelines.yaml: where the champion goes live
(``target``), how traffic moves to it (``strategy``), the checks it must pass first, and
each target's own settings."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from components.base import StrictModel, variable_name


class SmokeSpec(StrictModel):
    """Checks a candidate passes before any traffic reaches it (every target that can run
    them: the local endpoint; a KServe or SageMaker endpoint through its URL when given)."""
    examples: int = Field(32, ge=1, le=1000)  # test chats sent to the candidate (the prepare stage's test split)
    # The candidate's exact match on them may fall this far below the version's registered
    # evaluation (a small sample varies; a variant broken on this CPU scores near 0).
    exact_match_tolerance: float = Field(0.15, ge=0, le=1)
    min_valid_rate: float = Field(0.9, ge=0, le=1)  # answers that are valid JSON under the task's schema
    p95_latency_ms: float | None = Field(None, gt=0)  # null: the gates' latency budget (gates.*.latency)


class ShadowSpec(StrictModel):
    """strategy shadow: the candidate answers a copy of live requests; its answers are logged,
    never returned. After ``requests`` mirrored requests it goes live only if it agreed with
    the live version often enough, was as valid and not too slow."""
    requests: int = Field(50, ge=1)  # mirrored requests to judge on
    min_agreement: float = Field(0.8, ge=0, le=1)  # share of identical answers
    max_invalid_increase: float = Field(0.05, ge=0, le=1)  # candidate's invalid share minus the live one's
    max_p95_ratio: float = Field(1.5, gt=0)  # candidate p95 latency / live p95 latency
    wait_s: float = Field(1800, gt=0)  # not enough traffic by then: nothing switches, the stage fails


class CanarySpec(StrictModel):
    """strategy canary: a share of live requests is answered by the candidate; after
    ``min_requests`` of them it goes live, or is rolled back when it is worse than the live
    version beyond a margin."""
    share: float = Field(0.1, gt=0, lt=1)  # of live requests answered by the candidate
    min_requests: int = Field(50, ge=1)  # candidate requests to judge on
    max_error_rate_increase: float = Field(0.02, ge=0, le=1)  # 5xx share, candidate minus live
    max_invalid_increase: float = Field(0.05, ge=0, le=1)  # invalid answers, candidate minus live
    max_p95_ratio: float = Field(1.5, gt=0)  # candidate p95 latency / live p95 latency
    wait_s: float = Field(1800, gt=0)  # not enough traffic by then: rolled back, the stage fails


class LocalTarget(StrictModel):
    """target local: the endpoint of `llmops serve` on this machine (the serve section's host
    and port); started in the background when none runs."""
    url: str | None = None  # another running endpoint, e.g. http://10.0.0.5:8000; null: serve.host:serve.port
    start: bool = True  # no endpoint answering: start one (`llmops serve stop` stops it)
    load_timeout_s: float = Field(900, gt=0)  # loading a version and its golden prompt


class KServeTarget(StrictModel):
    """target kserve: an InferenceService (Hugging Face runtime; vLLM on GPU nodes) serving
    the version's merged weights from S3, and the gateway in front of it. Manifests are
    written to the stage folder; applied with kubectl when ``context`` is set."""
    namespace: str = "llmops"
    storage_uri: str = Field("s3://llmops/models", pattern=r"^s3://[^/]+")  # merged weights go to <this>/<name>/<version>/
    service_account: str = "kserve-storage"  # holds the S3 credentials secret
    # RawDeployment: a Deployment and Service, no Knative. Serverless (Knative) is the mode in
    # which KServe splits traffic between revisions: strategy canary needs it. A service keeps
    # the mode it was created in.
    deployment_mode: Literal["RawDeployment", "Serverless"] = "RawDeployment"
    runtime_args: list[str] = []  # extra Hugging Face runtime arguments, e.g. --max_model_len=2048
    gpus: int = Field(1, ge=0)  # per replica; 0: CPU (the runtime's Hugging Face backend)
    cpu: str = "4"
    memory: str = "16Gi"
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    gateway_image: str = "llmops:latest"  # the image of infra/Dockerfile
    gateway_replicas: int = Field(2, ge=1)
    context: str | None = None  # kubectl context to apply to; null: print the kubectl command


class SageMakerTarget(StrictModel):
    """target sagemaker: the version's files in S3, a SageMaker model, endpoint config and
    endpoint (blue/green with a canary step and alarm-driven auto-rollback on update).
    Credentials and region come from the AWS environment, never from here."""
    endpoint_name: str | None = None  # null: the registered model name
    s3_uri: str = Field("s3://llmops/sagemaker", pattern=r"^s3://[^/]+")  # model.tar.gz goes to <this>/<name>/<version>/
    image_uri: str = ""  # the inference container (e.g. the Hugging Face TGI image of your region)
    role_arn_env: str = "LLMOPS_SAGEMAKER_ROLE_ARN"  # environment variable with the execution role's ARN
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = Field(1, ge=1)
    canary_percent: int = Field(10, ge=1, le=50)  # capacity that takes traffic first on an update
    canary_wait_s: int = Field(300, ge=0, le=3600)  # watched this long before the rest shifts
    termination_wait_s: int = Field(300, ge=0, le=3600)  # the old fleet is kept this long after
    alarms: list[str] = []  # extra CloudWatch alarms that roll an update back (5xx and latency ones are created)
    max_p95_latency_ms: float = Field(2000, gt=0)  # the latency alarm's threshold
    wait_timeout_s: float = Field(1800, gt=0)  # not InService by then: the stage fails

    _env = field_validator("role_arn_env")(classmethod(lambda cls, v: variable_name(v)))


class DeploySpec(StrictModel):
    target: Literal["local", "kserve", "sagemaker"] = "local"
    strategy: Literal["direct", "shadow", "canary"] = "direct"
    smoke: SmokeSpec = SmokeSpec()
    shadow: ShadowSpec = ShadowSpec()
    canary: CanarySpec = CanarySpec()
    local: LocalTarget = LocalTarget()
    kserve: KServeTarget = KServeTarget()
    sagemaker: SageMakerTarget = SageMakerTarget()
