"""Replay test-split tickets through a running endpoint's /v1/triage, each with its creation
time (so the features are read as of then, as training read them), and check two things:
the answers against the gold labels (exact match, validity, latency), and the prompts the
endpoint logged against the ones prepare wrote for the same tickets.

    .venv/bin/llmops serve &                                   # the champion, with its request log
    .venv/bin/python bench/triage_replay.py --n 60             # http://127.0.0.1:8000

Reads the pipeline's prepare/test.jsonl and validate/tickets.parquet, and the endpoint's
request log folder (serve.request_log). Sequential: one request at a time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, default=60, help="test tickets, from the first")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    from llmops.spec import load_spec

    spec = load_spec(args.spec.resolve(), [])
    name, pipe = spec.pipeline(None)
    root = args.spec.resolve().parent
    stages = spec.artifacts_dir(root) / name
    examples = [json.loads(line) for line in (stages / "prepare" / "test.jsonl").read_text().splitlines()][:args.n]
    tickets = pd.read_parquet(stages / "validate" / "tickets.parquet").set_index("ticket_id")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    sent, hits, valid, latency = [], 0, 0, []
    with httpx.Client(timeout=120, headers=headers) as client:
        for example in examples:
            row = tickets.loc[example["ticket_id"]]
            body = {"ticket_id": example["ticket_id"], "subject": row.subject, "body": row.body,
                    "channel": row.channel, "customer_id": row.customer_id,
                    "time": pd.Timestamp(row.created_at).isoformat()}
            started = time.perf_counter()
            r = client.post(f"{args.url}/v1/triage", json=body)
            latency.append(time.perf_counter() - started)
            if r.status_code != 200:
                sys.exit(f"{example['ticket_id']}: {r.status_code} {r.text[:300]}")
            answer = r.json()
            sent.append((answer["id"], example))
            valid += answer["valid"]
            hits += answer["answer"] == json.loads(example["messages"][-1]["content"])
    n = len(examples)
    print(f"{n} test tickets with their times: exact match {hits / n:.3f}, valid {valid / n:.3f}, "
          f"p50 {1000 * statistics.median(latency):.0f} ms, max {1000 * max(latency):.0f} ms")
    log = spec.pipeline(None)[1].serve.request_log
    folder = Path(log.folder) if log.folder else spec.state_dir(root) / "serving" / "requests" / pipe.register_.model_name
    time.sleep(2)  # the log's writer is a background thread
    logged = {}
    for path in sorted(folder.glob("requests-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            logged[record.get("request_id")] = record
    found = [(logged[i], e) for i, e in sent if i in logged]
    same = sum(record["messages"] == example["messages"][:2] for record, example in found)
    print(f"logged prompts identical to prepare's: {same}/{len(found)} ({len(sent) - len(found)} not in {folder})")


if __name__ == "__main__":
    main()
