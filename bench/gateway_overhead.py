"""What a gateway adds: the same greedy chats sent, one at a time, to an endpoint that
generates (`llmops serve`) and to a gateway in front of it (`llmops serve` with
serve.upstream.url set to the first one's /v1), alternating which goes first; latency and
time to first token (streaming) of each, and the per-request difference.

    .venv/bin/python bench/gateway_overhead.py                    # the default pipeline's champion
    .venv/bin/python bench/gateway_overhead.py --requests 40 --max-tokens 32 --model support-triage/1 \\
        --set services.mlflow.tracking_uri=sqlite:///elsewhere/mlflow.db --chats test.jsonl

Both servers run with the response cache and the request log off, triage off. Prints one
JSON line. The gateway's answers are checked to equal the endpoint's.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import httpx
import numpy as np

from serve_load import add_server_args, one, start_server, read_chats


async def measure(urls: dict[str, str], model: str, chats: list[list[dict]], max_tokens: int) -> dict:
    times: dict[str, list[dict]] = {name: [] for name in urls}
    async with httpx.AsyncClient(timeout=300) as client:
        for i, messages in enumerate(chats):
            order = list(urls) if i % 2 == 0 else list(reversed(urls))
            for name in order:
                times[name].append(await one(client, urls[name], model, messages, max_tokens))
            body = {"model": model, "messages": messages, "max_tokens": max_tokens}
            answers = [(await client.post(f"{urls[n]}/v1/chat/completions", json=body)).json() for n in urls]
            if answers[0]["choices"][0]["message"] != answers[1]["choices"][0]["message"]:
                sys.exit(f"chat {i}: the gateway's answer differs from the endpoint's: {answers}")
    return times


def p(values: list[float], q: int) -> float:
    return round(1000 * float(np.percentile(values, q)), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_server_args(parser)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="spec override, both servers")
    args = parser.parse_args()
    args.spec = args.spec.resolve()
    from llmops.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    name, pipe = spec.pipeline(None)
    chats = [e["messages"][:-1] for e in read_chats(args, spec, name)][:args.requests]
    model = args.model or f"{pipe.register_.model_name}@champion"
    common = [x for o in args.overrides + ["serve.triage=false"] for x in ("--set", o)]
    procs = []
    try:
        endpoint, url, endpoint_s = start_server(args, "endpoint", common)
        procs.append(endpoint)
        gateway, gateway_url, gateway_s = start_server(args, "gateway", common + ["--set",
                                                                                 f"serve.upstream.url={url}/v1"])
        procs.append(gateway)
        times = asyncio.run(measure({"endpoint": url, "gateway": gateway_url}, model, chats, args.max_tokens))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    errors = {n: sum(r["status"] != 200 for r in rows) for n, rows in times.items()}
    if any(errors.values()):
        sys.exit(f"failed requests: {errors}")
    latency = {n: [r["latency_s"] for r in rows] for n, rows in times.items()}
    ttft = {n: [r["ttft_s"] for r in rows if r["ttft_s"] is not None] for n, rows in times.items()}
    added = [g - e for g, e in zip(latency["gateway"], latency["endpoint"])]
    print(json.dumps({"requests": len(chats), "max_tokens": args.max_tokens, "startup_s": {
        "endpoint": endpoint_s, "gateway": gateway_s},
        **{f"{n}_p50_ms": p(latency[n], 50) for n in latency}, **{f"{n}_p95_ms": p(latency[n], 95) for n in latency},
        **{f"{n}_ttft_p50_ms": p(ttft[n], 50) for n in ttft},
        "added_p50_ms": p(added, 50), "added_p95_ms": p(added, 95)}))


if __name__ == "__main__":
    main()
