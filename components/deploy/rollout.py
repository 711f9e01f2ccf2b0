"""target local, step by step (the checks and the endpoint client: components/deploy/local.py)."""
from __future__ import annotations

import os
from pathlib import Path

from components import background
from components.base import StageError, StageIO
from components.deploy import local
from components.deploy.local import Attempt, Endpoint, EndpointError
from components.deploy.settings import DeploySpec
from components.splits import read_examples


def latency_budget(gates) -> float | None:
    """The gates' p95 latency budget (ms), if they have one."""
    for gate in getattr(gates, "checks", {}).values():
        if getattr(gate, "kind", None) == "budget" and getattr(gate, "metric", None) == "latency_p95_ms":
            return gate.max
    return None


def deploy_local(cfg: DeploySpec, io: StageIO, name: str, attempt: Attempt, progress=print) -> None:
    """Roll the champion out on the local endpoint; ``attempt`` says what happened. Raises
    StageError (with ``attempt.reason``) when it could not be made live."""
    from serving.model import answer_schema, fetched
    from serving.settings import load_keys

    serve = io.sections["serve"]
    model = f"{name}/{attempt.version}"
    url = attempt.url = local.endpoint_url(cfg.local, serve)
    try:
        keys = load_keys(serve, io.root)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    endpoint = Endpoint(url, os.environ.get(serve.admin_key_env) or None, next(iter(keys.values()), None),
                        timeout_s=serve.limits.request_timeout_s + 10)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one download, no bar in the log
    _, manifest = fetched(name, attempt.version, io.state_dir)
    schema = answer_schema(manifest)
    examples = read_examples(io.inputs["prepare"] / "test.jsonl")[: cfg.smoke.examples]
    max_tokens = min(io.sections["evaluate"].max_new_tokens, serve.limits.max_tokens)
    budget = cfg.smoke.p95_latency_ms or latency_budget(io.sections.get("gates"))

    def judged(candidate: bool) -> bool:
        result = local.smoke(endpoint, model, examples, schema, max_tokens, candidate, progress)
        attempt.numbers["smoke"] = result
        attempt.checks += local.judge_smoke(result, manifest.get("metrics", {}), cfg.smoke, budget)
        return not attempt.failed()

    status = endpoint.status()
    if status is None:
        attempt.previous = None  # nothing answers there: nothing is live, whatever the alias last said
        if not cfg.local.start:
            raise _refuse(attempt, f"no endpoint answers at {url} and deploy.local.start is false")
        progress(f"deploy: no endpoint at {url}; starting one for {model} (llmops serve, in the background)")
        started = local.start_endpoint(Path(io.context.get("spec_file") or io.root / "pipelines.yaml"),
                                       list(io.context.get("overrides") or []), io.pipeline, model, serve.host,
                                       serve.port, io.state_dir, cfg.local.load_timeout_s)
        attempt.started_endpoint = True
        try:
            local.wait_ready(url, cfg.local.load_timeout_s)
            progress(f"deploy: {model} answers its golden prompt; smoke set of {len(examples)} test chats ...")
            if not judged(candidate=False):
                raise _refuse(attempt, "; ".join(c.line() for c in attempt.failed()))
        except StageError:
            background.stop_pid(int(started.record["pid"]))
            started.record_path.unlink(missing_ok=True)
            attempt.reason = (attempt.reason or "the endpoint never became ready") + \
                f"; the endpoint started for it was stopped (log: {started.log})"
            raise
        attempt.outcome = "deployed"
        progress(f"deploy: {model} is live at {url} (pid {started.record['pid']}; `llmops serve stop` stops it)")
        return
    live = status["live"]["model"]
    attempt.previous = _number(live) if live.startswith(f"{name}/") else attempt.previous  # what answers there now
    if live == model:
        attempt.outcome = "already live"
        progress(f"deploy: {model} is already live at {url}")
        return
    progress(f"deploy: {url} serves {live}; loading {model} beside it ...")
    try:
        loaded = endpoint.admin("POST", "candidate", {"model": model, "alias": "champion",
                                                      "timeout_s": cfg.local.load_timeout_s},
                                timeout_s=cfg.local.load_timeout_s + 30)["candidate"]
    except EndpointError as exc:
        raise _refuse(attempt, str(exc)) from None
    progress(f"deploy: {model} ({loaded['variant']}) loaded in {loaded['load_s']} s and answered its golden prompt "
             f"in {loaded['golden_s']} s; smoke set of {len(examples)} test chats ...")
    try:
        if not judged(candidate=True):
            raise _refuse(attempt, "; ".join(c.line() for c in attempt.failed()))
        if cfg.strategy == "shadow":
            _live_traffic(endpoint, attempt, "shadow", cfg, progress)
        elif cfg.strategy == "canary":
            _live_traffic(endpoint, attempt, "canary", cfg, progress)
        switched = endpoint.admin("POST", "switch", {"model": model})
    except BaseException:
        try:
            endpoint.admin("DELETE", "candidate", {"reason": attempt.reason or "the deploy stage stopped"})
        except EndpointError:
            pass  # already gone (or the endpoint itself is): nothing switched either way
        raise
    attempt.outcome = "deployed"
    progress(f"deploy: {model} is live at {url} (was {switched['previous']}; it is unloaded once its requests finish)")


def _live_traffic(endpoint: Endpoint, attempt: Attempt, mode: str, cfg: DeploySpec, progress) -> None:
    """Give the candidate live traffic (a copy, or a share), wait for enough, judge it."""
    if mode == "shadow":
        spec = cfg.shadow
        endpoint.admin("POST", "route", {"mode": "shadow"})
        progress(f"deploy: shadow: the candidate answers copies of live requests until {spec.requests} "
                 f"(at most {spec.wait_s:.0f} s)")
        observations = local.watch(endpoint, lambda obs: len(obs) >= spec.requests, spec.wait_s, "shadow", progress)
        checks, numbers = local.judge_shadow(observations, spec)
    else:
        spec = cfg.canary
        endpoint.admin("POST", "route", {"mode": "canary", "share": spec.share})
        progress(f"deploy: canary: {spec.share:.0%} of live requests go to the candidate until it answered "
                 f"{spec.min_requests} (at most {spec.wait_s:.0f} s)")
        observations = local.watch(endpoint, lambda obs: sum(o.get("arm") == "candidate" for o in obs)
                                   >= spec.min_requests, spec.wait_s, "canary", progress)
        checks, numbers = local.judge_canary(observations, spec)
    endpoint.admin("POST", "route", {"mode": "none"})
    attempt.numbers[mode] = numbers
    attempt.checks += checks
    for c in checks:
        progress(f"  {c.line()}")
    if attempt.failed():
        outcome = "rolled back" if mode == "canary" else "refused"
        raise _refuse(attempt, "; ".join(c.line() for c in attempt.failed()), outcome)


def _refuse(attempt: Attempt, reason: str, outcome: str = "refused") -> StageError:
    attempt.outcome, attempt.reason = outcome, reason
    return StageError(reason)


def _number(model_id: str) -> int | None:
    tail = model_id.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None
