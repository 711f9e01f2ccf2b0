"""target local: a version goes live on the endpoint of `llmops serve` without downtime.

The endpoint loads the version beside the live one and answers its golden prompt
(serving/rollout.py); then the smoke set (test chats of the prepare stage) is sent to the
candidate as a client would send it, and judged against the version's registered
evaluation: answer validity, exact match within a tolerance, p95 latency within the
budget. With ``strategy: shadow`` the candidate then answers copies of live traffic; with
``canary`` a share of it; each judged against the live version on the same traffic. Only
when every check passed does the endpoint switch; otherwise the candidate is unloaded and
the live version never stopped answering.

No endpoint answering: one is started in the background with the version (its record,
pid and port, in ``<state>/serving/endpoint-<pipeline>.json``; `llmops serve stop` stops
it), and the smoke set is judged on it before the stage says it is live.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np

from components.base import StageError
from components.deploy.settings import CanarySpec, ShadowSpec, SmokeSpec
from components.reports import DeployCheck as Check


def check(name: str, observed: float | None, op: str, threshold: float, detail: str = "") -> Check:
    ok = observed is not None and (observed >= threshold if op == ">=" else observed <= threshold)
    return Check(name=name, observed=None if observed is None else round(float(observed), 4),
                 threshold=round(float(threshold), 4), op=op, passed=ok, detail=detail)


def p95(values: list[float]) -> float | None:
    return None if not values else round(float(np.percentile(values, 95)), 1)


class EndpointError(StageError):
    """The endpoint refused a rollout call or did not answer; the message says which and why."""


@dataclass
class Endpoint:
    """The admin and chat routes of a running endpoint (serving/rollout.py)."""
    url: str
    admin_key: str | None = None
    api_key: str | None = None
    timeout_s: float = 120.0

    def _headers(self, admin: bool) -> dict:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def admin(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
        try:
            r = httpx.request(method, f"{self.url}/admin/{path}", json=body, headers=self._headers(True),
                              timeout=timeout_s or self.timeout_s)
        except httpx.TransportError as exc:
            raise EndpointError(f"the endpoint at {self.url} did not answer {method} /admin/{path}: "
                                f"{exc or type(exc).__name__}") from None
        if r.status_code >= 400:
            try:
                reason = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                reason = r.text[:300]
            raise EndpointError(f"{method} /admin/{path} at {self.url}: {r.status_code}: {reason}")
        return r.json()

    def status(self) -> dict | None:
        """The endpoint's rollout status; None when nothing answers at the URL."""
        try:
            return self.admin("GET", "status", timeout_s=10)
        except EndpointError as exc:
            if "did not answer" in str(exc):
                return None
            raise

    def chat(self, model: str, messages: list[dict], max_tokens: int, candidate: bool) -> dict:
        """One smoke chat (greedy, JSON): status, answer text, latency as the client saw it, and
        the version that answered (X-LLMOps-Model)."""
        headers = self._headers(False) | {"X-LLMOps-Probe": "smoke"}  # the request's own API key, as a client
        headers |= {"X-LLMOps-Target": "candidate" if candidate else "live"} | (  # sends it; the admin key beside
            {"X-LLMOps-Admin-Key": self.admin_key} if self.admin_key else {})
        started = time.perf_counter()
        try:
            r = httpx.post(f"{self.url}/v1/chat/completions", headers=headers, timeout=self.timeout_s,
                           json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                 "response_format": {"type": "json_object"}})
        except httpx.TransportError as exc:
            return {"status": 0, "text": None, "latency_ms": 1000 * (time.perf_counter() - started),
                    "error": str(exc) or type(exc).__name__, "model": None}
        latency = 1000 * (time.perf_counter() - started)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        text = ((body.get("choices") or [{}])[0].get("message") or {}).get("content") if r.status_code == 200 else None
        return {"status": r.status_code, "text": text, "latency_ms": latency, "model": r.headers.get("x-llmops-model"),
                "error": None if r.status_code == 200 else (body.get("error") or {}).get("message", r.text[:200])}


def smoke(endpoint: Endpoint, model: str, examples: list[dict], schema, max_tokens: int, candidate: bool,
          progress: Callable[[str], None] = print) -> dict:
    """Send each example's prompt to the endpoint (to the candidate when ``candidate``) one at
    a time; score the answers as the evaluate stage does. Returns n, failed, json_valid_rate,
    exact_match, p50/p95 latency (ms) and the first failures."""
    answers, latencies, failures = [], [], []
    for i, example in enumerate(examples):
        got = endpoint.chat(model, example["messages"][:-1], max_tokens, candidate)
        if got["status"] != 200:
            failures.append(f"example {i}: {got['status']} {got['error']}")
        elif got["model"] != model:
            failures.append(f"example {i}: answered by {got['model']}, not {model}")
        answers.append(got["text"] or "")
        latencies.append(got["latency_ms"])
        if (i + 1) % 8 == 0 or i + 1 == len(examples):
            progress(f"  smoke: {i + 1}/{len(examples)} answered")
    scores = schema.score([e["labels"] for e in examples], answers)
    return {"n": len(examples), "failed": len(failures), "json_valid_rate": scores["json_valid_rate"],
            "exact_match": scores["exact_match"], "latency_p50_ms": round(float(np.median(latencies)), 1),
            "latency_p95_ms": p95(latencies), "failures": failures[:5]}


def judge_smoke(result: dict, registered: dict, cfg: SmokeSpec, budget_ms: float | None) -> list[Check]:
    """The smoke set's checks: no failed request, validity, exact match against the version's
    registered evaluation, p95 latency within the budget (when there is one)."""
    checks = [check("smoke failed requests", result["failed"], "<=", 0, "; ".join(result["failures"][:2])),
              check("smoke answer validity", result["json_valid_rate"], ">=", cfg.min_valid_rate,
                    "deploy.smoke.min_valid_rate")]
    if registered.get("exact_match") is not None:
        floor = max(0.0, float(registered["exact_match"]) - cfg.exact_match_tolerance)
        checks.append(check("smoke exact match", result["exact_match"], ">=", floor,
                            f"registered {float(registered['exact_match']):g} - tolerance "
                            f"{cfg.exact_match_tolerance:g}"))
    if budget_ms is not None:
        checks.append(check("smoke p95 latency ms", result["latency_p95_ms"], "<=", budget_ms,
                            f"over {result['n']} requests, one at a time"))
    return checks


def _arm(rows: list[dict]) -> dict:
    n = len(rows)
    answered = [r for r in rows if r["status"] == 200]
    judged = [r for r in answered if r.get("valid") is not None]
    return {"requests": n, "error_rate": round(sum(r["status"] >= 500 for r in rows) / n, 4) if n else None,
            "invalid_rate": round(sum(not r["valid"] for r in judged) / len(judged), 4) if judged else 0.0,
            "latency_p95_ms": p95([r["latency_ms"] for r in answered])}


def judge_shadow(observations: list[dict], cfg: ShadowSpec) -> tuple[list[Check], dict]:
    """Candidate against live on the same mirrored requests: answer agreement, validity, p95."""
    pairs = [o for o in observations if "live" in o and "candidate" in o][: cfg.requests]
    live, cand = _arm([p["live"] for p in pairs]), _arm([p["candidate"] for p in pairs])
    both = [p for p in pairs if p["live"]["status"] == 200 and p["candidate"]["status"] == 200]
    agreement = round(sum(p["live"]["text"] == p["candidate"]["text"] for p in both) / len(both), 4) if both else None
    numbers = {"requests": len(pairs), "agreement": agreement, "live": live, "candidate": cand}
    ratio = (cand["latency_p95_ms"] / live["latency_p95_ms"]) if live["latency_p95_ms"] and cand["latency_p95_ms"] \
        else None
    checks = [check("shadow requests", len(pairs), ">=", cfg.requests),
              check("shadow answer agreement", agreement, ">=", cfg.min_agreement, f"over {len(both)} answered pairs"),
              check("shadow candidate errors", cand["error_rate"], "<=", live["error_rate"] or 0.0, "5xx share"),
              check("shadow invalid increase", None if cand["invalid_rate"] is None else
                    cand["invalid_rate"] - (live["invalid_rate"] or 0.0), "<=", cfg.max_invalid_increase),
              check("shadow p95 latency ratio", None if ratio is None else round(ratio, 3), "<=", cfg.max_p95_ratio,
                    f"candidate {cand['latency_p95_ms']} ms / live {live['latency_p95_ms']} ms")]
    return checks, numbers


def judge_canary(observations: list[dict], cfg: CanarySpec) -> tuple[list[Check], dict]:
    """Each arm's outcomes on its share of live traffic: error rate, invalid answers, p95."""
    arms = {arm: _arm([o for o in observations if o.get("arm") == arm]) for arm in ("live", "candidate")}
    live, cand = arms["live"], arms["candidate"]
    ratio = (cand["latency_p95_ms"] / live["latency_p95_ms"]) if live["latency_p95_ms"] and cand["latency_p95_ms"] \
        else None
    checks = [check("canary candidate requests", cand["requests"], ">=", cfg.min_requests),
              check("canary error rate increase", None if cand["error_rate"] is None else
                    cand["error_rate"] - (live["error_rate"] or 0.0), "<=", cfg.max_error_rate_increase),
              check("canary invalid increase", None if not cand["requests"] else
                    cand["invalid_rate"] - live["invalid_rate"], "<=", cfg.max_invalid_increase),
              check("canary p95 latency ratio", None if ratio is None else round(ratio, 3), "<=", cfg.max_p95_ratio,
                    f"candidate {cand['latency_p95_ms']} ms / live {live['latency_p95_ms']} ms")]
    return checks, arms


def watch(endpoint: Endpoint, enough: Callable[[list[dict]], bool], wait_s: float, label: str,
          progress: Callable[[str], None] = print, poll_s: float = 2.0) -> list[dict]:
    """Observations of live traffic (shadow pairs or canary arms) until ``enough`` of them, or
    ``wait_s`` passed; progress every ~15 s."""
    deadline, said = time.monotonic() + wait_s, 0.0
    while True:
        observations = endpoint.admin("GET", "observations")["observations"]
        if enough(observations) or time.monotonic() > deadline:
            return observations
        if time.monotonic() - said > 15:
            progress(f"  {label}: {len(observations)} requests observed so far")
            said = time.monotonic()
        time.sleep(poll_s)


@dataclass
class Started:
    """An endpoint this stage started in the background."""
    record: dict
    record_path: Path
    log: Path


def serve_url(host: str, port: int) -> str:
    """Where a client on this machine reaches an endpoint bound to ``host:port``."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def endpoint_url(local, serve) -> str:
    """The endpoint the local target deploys to: ``deploy.local.url``, else the serve section's."""
    return (local.url or serve_url(serve.host, serve.port)).rstrip("/")


def record_path(state_dir: Path, pipeline: str) -> Path:
    return state_dir / "serving" / f"endpoint-{pipeline}.json"


def start_endpoint(spec_file: Path, overrides: list[str], pipeline: str, model: str, host: str, port: int,
                   state_dir: Path, timeout_s: float, env: dict | None = None) -> Started:
    """`llmops serve` for ``model`` in a session of its own (it outlives the run), once it
    answers /health; its record names pid, port and log. StageError with the log's tail if it
    exits or does not answer in time."""
    import sys

    from components import background

    log = state_dir / "serving" / f"endpoint-{pipeline}.log"
    cmd = [sys.executable, "-m", "llmops", "serve", "-f", str(spec_file), "-p", pipeline, "--model", model,
           "--host", host, "--port", str(port)]
    for item in overrides:
        cmd += ["--set", item]
    url = serve_url(host, port)

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False
    path = record_path(state_dir, pipeline)
    try:
        record = background.launch(cmd, log, path, up, timeout_s, cwd=spec_file.parent,
                                   env=(env or dict(os.environ)), url=url, model=model, pipeline=pipeline)
    except RuntimeError as exc:
        raise StageError(f"the endpoint did not start: {exc}") from None
    return Started(record, path, log)


def wait_ready(url: str, timeout_s: float) -> dict:
    """/ready's body once it says ready, or StageError with its last reason."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/ready", timeout=10)
            last = r.json()
            if r.status_code == 200:
                return last
            if "not been answered yet" not in str(last.get("reason")):
                break
        except (httpx.TransportError, ValueError) as exc:
            last = {"reason": str(exc)}
        time.sleep(0.5)
    raise StageError(f"the endpoint at {url} is not ready: {(last or {}).get('reason', 'no answer')}")


@dataclass
class Attempt:
    """What one deploy attempt did, for the report, the audit log and `llmops deploy status`."""
    version: int
    target: str
    strategy: str
    outcome: str = "failed"  # deployed | already live | failed | rolled back
    reason: str | None = None
    checks: list[Check] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    previous: int | None = None
    started_endpoint: bool = False

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]
