"""Fixtures of the deploy target tests: a local AWS API (moto's server) that answers
SageMaker's UpdateEndpoint, which moto 5.2.5 does not implement.

The extension (``_update_endpoint``) is installed on moto's SageMaker responder for one test
and removed after it. It does what the UpdateEndpoint API reference and the deployment
guardrails guide describe, on moto's own backend objects:
- the endpoint and the endpoint config must exist (a ValidationException as SageMaker's
  otherwise), and so must every auto-rollback alarm in CloudWatch;
- the DeploymentConfig sent is kept as the endpoint's LastDeploymentConfig, which
  DescribeEndpoint returns (as SageMaker does), so a test reads it back through boto3;
- the endpoint moves to the new config and its variants and stays InService (moto has no
  fleets to shift), unless one of the rollback alarms is in ALARM: then the update is rolled
  back, and the endpoint stays InService on its old config.
"""
from __future__ import annotations

import httpx
import pytest


def _update_endpoint(self):
    """SageMakerResponse.update_endpoint (moto's responder method for UpdateEndpoint)."""
    from moto.cloudwatch.models import cloudwatch_backends
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.sagemaker.exceptions import ValidationError
    from moto.sagemaker.models import FakeEndpoint

    backend = self.sagemaker_backend
    name, config_name = self._get_param("EndpointName"), self._get_param("EndpointConfigName")
    endpoint = backend.endpoints.get(name)
    if endpoint is None:
        arn = FakeEndpoint.arn_formatter(name, self.current_account, self.region)
        raise ValidationError(message=f"Could not find endpoint '{arn}'.")
    config = backend.describe_endpoint_config(config_name)  # ValidationError when missing
    deployment = self._get_param("DeploymentConfig") or {}
    alarms = cloudwatch_backends[self.current_account][self.region].alarms
    names = [a["AlarmName"] for a in deployment.get("AutoRollbackConfiguration", {}).get("Alarms", [])]
    if unknown := [a for a in names if a not in alarms]:
        raise ValidationError(message=f"Could not find CloudWatch alarm(s) {', '.join(unknown)}.")
    endpoint.last_deployment_config = deployment
    endpoint.last_modified_time = utcnow()
    if not any(alarms[a].state_value == "ALARM" for a in names):
        endpoint.endpoint_config_name = config_name
        endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
    return ActionResult({"EndpointArn": endpoint.arn})


@pytest.fixture
def aws_api(s3_endpoint, monkeypatch):
    """moto's server (S3, SageMaker with UpdateEndpoint, CloudWatch) on 127.0.0.1, reset,
    with boto3 pointed at it through AWS_ENDPOINT_URL as a user's environment would;
    yields its URL."""
    from moto.sagemaker.responses import SageMakerResponse

    httpx.post(f"{s3_endpoint}/moto-api/reset").raise_for_status()  # moto's backends outlive a server
    monkeypatch.setattr(SageMakerResponse, "update_endpoint", _update_endpoint, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    yield s3_endpoint
