"""Load on the endpoint: concurrent clients sending real test-split chats to
/v1/chat/completions and real test-split tickets to /v1/triage, against
(a) the naive baseline: the same HTTP API on the uncompressed model (base + adapter, PyTorch
fp32), one request generated at a time (--weights adapter, max_batch_size 1), and
(b) the endpoint as configured (the registered serving variant, batching as in the spec).

Each configuration runs as `llmops serve` in its own process on 127.0.0.1, started and
stopped here. Per configuration: start-up time (until /ready), server RSS, requests/s,
generated tokens/s, latency p50/p95/p99, time to first token (streaming), errors; at one
client the latency is compared with a direct in-process call of the same engine.

    .venv/bin/python bench/serve_load.py                      # the champion of the default pipeline
    .venv/bin/python bench/serve_load.py --clients 32 --requests 96 --max-seconds 300
    .venv/bin/python bench/serve_load.py --routes triage     # one route only

Triage requests read features and articles through the feature server: the benchmark
starts one (`llmops features serve`) unless one runs, shares it between the two
configurations and stops it at the end.

Prints a table and one JSON line. Bounded in requests and time. The servers run with the
response cache off, so every request is generated.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20, 1)


def start_server(args, name: str, extra: list[str]) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "llmops"), "serve", "--file", str(args.spec), "--port", str(port),
           "--set", "serve.cache.max_entries=0", "--set", "serve.request_log.enabled=false", *extra]
    if args.model:
        cmd += ["--model", args.model]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=args.spec.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            sys.exit(f"{name}: llmops serve exited: {proc.stderr.read().strip()}")
        try:
            ready = httpx.get(f"{url}/ready", timeout=5)
            if ready.status_code == 200:
                return proc, url, round(time.perf_counter() - started, 1)
            if "not been answered yet" not in ready.text and "not ready" in ready.text:
                print(f"{name}: /ready says {ready.json().get('reason')}; measuring anyway", file=sys.stderr)
                return proc, url, round(time.perf_counter() - started, 1)
        except httpx.TransportError:
            pass
        if time.perf_counter() - started > 600:
            proc.kill()
            sys.exit(f"{name}: not ready after 600 s")
        time.sleep(0.5)


async def one(client: httpx.AsyncClient, url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    started = time.perf_counter()
    first, tokens, status = None, 0, 0
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    status = 500
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - started
    except httpx.HTTPError:
        status = -1
    return {"status": status, "latency_s": time.perf_counter() - started, "ttft_s": first, "tokens": tokens}


async def one_triage(client: httpx.AsyncClient, url: str, ticket: dict, max_tokens: int) -> dict:
    started = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/triage", json=ticket | {"max_tokens": max_tokens})
        status = r.status_code
        tokens = r.json()["usage"]["completion_tokens"] if status == 200 else 0
    except httpx.HTTPError:
        status, tokens = -1, 0
    return {"status": status, "latency_s": time.perf_counter() - started, "ttft_s": None, "tokens": tokens}


async def load(url: str, model: str, chats: list, clients: int, requests: int, max_tokens: int,
               max_seconds: float, route: str = "chat") -> dict:
    todo = list(range(min(requests, len(chats))))
    results: list[dict] = []
    deadline = time.perf_counter() + max_seconds

    async def worker(client):
        while todo and time.perf_counter() < deadline:
            i = todo.pop(0)
            results.append(await (one(client, url, model, chats[i], max_tokens) if route == "chat"
                                  else one_triage(client, url, chats[i], max_tokens)))

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=max_seconds, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    lat = np.array([r["latency_s"] for r in ok]) * 1000 if ok else np.array([np.nan])
    ttft = np.array([r["ttft_s"] for r in ok if r["ttft_s"] is not None]) * 1000
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "wall_s": round(wall, 1), "requests_per_s": round(len(ok) / wall, 3),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1) if len(ttft) else None}


def direct_latency_ms(args, chats: list[list[dict]], weights: str, max_tokens: int, n: int) -> float:
    """p50 of n answers from the same engine called in-process (no HTTP)."""
    from components.lm import prompt_ids
    from llmops.runner import configure_environment
    from llmops.spec import load_spec
    from serving.engine import Engine
    from serving.model import ModelRef, load_version

    spec = load_spec(args.spec, [])
    _, pipe = spec.pipeline(None)
    configure_environment(spec, args.spec.parent)
    served = load_version(ModelRef.parse(args.model or f"{pipe.register_.model_name}@champion"), spec.models,
                          spec.state_dir(args.spec.parent), weights)
    engine = Engine(served.tokenizer, served.model).start()
    try:
        times = [engine.complete(prompt_ids(c, served.tokenizer), max_tokens).total_s for c in chats[:n]]
    finally:
        engine.stop()
    return round(1000 * float(np.median(times)), 1)


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """--spec, --model, --chats: what the endpoint benchmarks serve and send."""
    parser.add_argument("--spec", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--model", help="name@alias or name/version (default: the pipeline's champion)")
    parser.add_argument("--chats", type=Path, help="JSONL chats (default: the pipeline's prepare/test.jsonl)")


def read_chats(args, spec, name: str) -> list[dict]:
    """The chats of --chats, or of the pipeline's prepare/test.jsonl; exits when there are none."""
    chats_path = args.chats or spec.artifacts_dir(args.spec.parent) / name / "prepare" / "test.jsonl"
    if not chats_path.exists():
        sys.exit(f"{chats_path}: no chats (run the pipeline through prepare, or pass --chats)")
    return [json.loads(line) for line in chats_path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(parser)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=96, help="per configuration at --clients")
    parser.add_argument("--single", type=int, default=6, help="requests at 1 client (and direct calls)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-seconds", type=float, default=300, help="per load run")
    parser.add_argument("--routes", default="chat,triage", help="comma-separated: chat, triage")
    args = parser.parse_args()
    args.spec = args.spec.resolve()
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    if not routes or set(routes) - {"chat", "triage"}:
        sys.exit(f"--routes {args.routes!r}: expected chat and/or triage")
    from llmops.spec import load_spec

    spec = load_spec(args.spec, [])
    name, pipe = spec.pipeline(None)
    examples = read_chats(args, spec, name)
    work = {"chat": [e["messages"][:-1] for e in examples]}
    if "triage" in routes:
        work["triage"] = tickets(spec, args.spec.parent, name, examples)
    model_id = args.model or f"{pipe.register_.model_name}@champion"
    configs = {"baseline": ["--weights", "adapter", "--set", "serve.batching.max_batch_size=1"],
               "endpoint": []}
    rows: dict = {route: {} for route in routes}
    feature_server = start_feature_server(args) if "triage" in routes else None
    try:
        for config, extra in configs.items():
            proc, url, startup_s = start_server(args, config, extra)
            try:
                served = httpx.get(f"{url}/v1/models").json()["data"][0]
                for route in routes:
                    items = work[route]
                    single = asyncio.run(load(url, model_id, items, 1, args.single, args.max_tokens, args.max_seconds,
                                              route))
                    loaded = asyncio.run(load(url, model_id, items[args.single:], args.clients, args.requests,
                                              args.max_tokens, args.max_seconds, route))
                    rows[route][config] = {"variant": served["variant"], "startup_s": startup_s,
                                           "rss_mib": rss_mib(proc.pid), "single": single, "loaded": loaded}
                    print(f"{route} {config}: {json.dumps(rows[route][config])}", file=sys.stderr, flush=True)
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
    finally:
        if feature_server:
            subprocess.run([str(Path(sys.executable).parent / "llmops"), "features", "stop", "--file", str(args.spec)],
                           cwd=args.spec.parent, capture_output=True)
    direct = direct_latency_ms(args, work["chat"], "serving", args.max_tokens, args.single)
    summary = {"clients": args.clients, "max_tokens": args.max_tokens, "cpu_threads": os.cpu_count(),
               "direct_p50_ms": direct}
    print(f"{'':17} {'variant':14} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'TTFT ms':>8} {'errors':>6} {'RSS MiB':>8} {'start s':>7}")
    for route in routes:
        for config, row in rows[route].items():
            m = row["loaded"]
            print(f"{route + ' ' + config:17} {row['variant']:14} {m['requests_per_s']:7.2f} {m['tokens_per_s']:7.1f} "
                  f"{m['p50_ms']:8.0f} {m['p95_ms']:8.0f} {m['p99_ms']:8.0f} {m['ttft_p50_ms'] or 0:8.0f} "
                  f"{m['errors']:6d} {row['rss_mib']:8.0f} {row['startup_s']:7.1f}")
        base, best = rows[route]["baseline"]["loaded"], rows[route]["endpoint"]["loaded"]
        summary[route] = {**rows[route],
                          "throughput_ratio": round(best["tokens_per_s"] / base["tokens_per_s"], 2)
                          if base["tokens_per_s"] else None,
                          "requests_ratio": round(best["requests_per_s"] / base["requests_per_s"], 2)
                          if base["requests_per_s"] else None,
                          "p95_ratio": round(best["p95_ms"] / base["p95_ms"], 2)}
        print(f"{route}: endpoint vs baseline at {args.clients} clients: {summary[route]['throughput_ratio']}x "
              f"tokens/s, {summary[route]['requests_ratio']}x requests/s, p95 x{summary[route]['p95_ratio']}; "
              f"1 client p50 {rows[route]['endpoint']['single']['p50_ms']} ms")
    print(f"chat at 1 client vs a direct in-process call: {direct} ms (x"
          f"{round(rows['chat']['endpoint']['single']['p50_ms'] / direct, 3) if 'chat' in rows else '-'})")
    print(json.dumps(summary))


def tickets(spec, root: Path, pipeline: str, examples: list[dict]) -> list[dict]:
    """The test split's tickets as /v1/triage requests (the fields the validated table has)."""
    import pandas as pd

    table = pd.read_parquet(spec.artifacts_dir(root) / pipeline / "validate" / "tickets.parquet")
    table = table.set_index("ticket_id")
    out = []
    for e in examples:
        row = table.loc[e["ticket_id"]]
        out.append({"ticket_id": e["ticket_id"], "subject": row.subject, "body": row.body, "channel": row.channel,
                    "customer_id": row.customer_id})
    return out


def start_feature_server(args) -> bool:
    """`llmops features serve` for the spec's state folder; True when it started one now."""
    proc = subprocess.run([str(Path(sys.executable).parent / "llmops"), "features", "serve", "--file", str(args.spec)],
                          cwd=args.spec.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"llmops features serve failed: {proc.stdout.strip()} {proc.stderr.strip()}")
    return "started" in proc.stdout and "already running" not in proc.stdout


if __name__ == "__main__":
    main()
