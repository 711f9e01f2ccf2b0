"""Steady client traffic on a running endpoint while a deploy happens: real test-split chats
(JSON answers) from a few concurrent clients, until a command ends (e.g. `llmops stage
deploy`), bounded in requests and time. Reports what a client saw: failed requests, the
version that answered each request (X-LLMOps-Model) and how often it changed per client,
latency, and the command's exit code and last lines.

    .venv/bin/python bench/rollout_load.py -- .venv/bin/llmops stage deploy --set deploy.strategy=canary
    .venv/bin/python bench/rollout_load.py --clients 4 --max-requests 2000 --max-seconds 900 -- <command>

Reads the pipeline's prepare/test.jsonl; the endpoint at serve.host:serve.port (--url).
Prints one JSON line at the end.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--url", default=None, help="the endpoint (default: serve.host:serve.port)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--max-seconds", type=float, default=1800)
    parser.add_argument("--after-s", type=float, default=5.0, help="keep the load this long after the command")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run under load")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run under load after --")

    from components.splits import read_examples
    from llmops.spec import load_spec

    spec = load_spec(args.spec)
    name, pipe = spec.pipeline(None)
    url = (args.url or f"http://{pipe.serve.host}:{pipe.serve.port}").rstrip("/")
    chats = [e["messages"][:-1] for e in read_examples(spec.artifacts_dir(args.spec.parent) / name / "prepare"
                                                         / "test.jsonl")]
    model = pipe.register_.model_name
    results: list[tuple] = []
    stop, deadline = threading.Event(), time.monotonic() + args.max_seconds

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = i
            while not stop.is_set() and len(results) < args.max_requests and time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/chat/completions", json={
                        "model": model, "messages": chats[n % len(chats)], "max_tokens": 48, "temperature": 0,
                        "response_format": {"type": "json_object"}})
                    outcome = (r.status_code, r.headers.get("x-llmops-model"),
                               (r.json().get("llmops") or {}).get("valid") if r.status_code == 200 else None)
                except httpx.HTTPError as exc:
                    outcome = (f"{type(exc).__name__}", None, None)
                results.append((i, started, time.perf_counter(), *outcome))
                n += args.clients

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(2)
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    ran_s = time.perf_counter() - began
    time.sleep(args.after_s)
    stop.set()
    for t in threads:
        t.join(timeout=150)
    failed = [r for r in results if r[3] != 200]
    changes = []
    for i in range(args.clients):
        seen = [r[4] for r in sorted((r for r in results if r[0] == i), key=lambda r: r[1])]
        changes.append(sum(a != b for a, b in zip(seen, seen[1:])))
    latencies = [1000 * (r[2] - r[1]) for r in results if r[3] == 200]
    summary = {"requests": len(results), "failed": len(failed), "failures": Counter(str(r[3]) for r in failed),
               "answered_by": Counter(r[4] for r in results), "version_changes_per_client": changes,
               "valid": round(sum(r[5] is True for r in results) / max(1, len(results)), 3),
               "latency_p50_ms": round(float(np.median(latencies)), 1) if latencies else None,
               "latency_p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
               "command_exit": done.returncode, "command_s": round(ran_s, 1)}
    print("\n".join((done.stdout + done.stderr).strip().splitlines()[-25:]))
    print(f"{len(results)} requests from {args.clients} clients during the command ({ran_s:.0f} s): "
          f"{len(failed)} failed; answered by {dict(summary['answered_by'])}; version changes per client {changes}")
    print(json.dumps(summary, default=dict))


if __name__ == "__main__":
    main()
