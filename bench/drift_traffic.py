"""Send generated traffic through a running endpoint's /v1/triage, ordinary or shifted, so
that `llmops monitor` has real live traffic to judge.

    .venv/bin/llmops serve &
    .venv/bin/python bench/drift_traffic.py --n 200                          # ordinary
    .venv/bin/python bench/drift_traffic.py --n 200 --shift language --share 0.25
    .venv/bin/llmops monitor --last 200

Ordinary tickets are the demo generator's next tickets after the ones the pipeline trained
on (same seed and customers as ``ingest.source``, never seen in training); shifted ones
come from its ``--shift`` modes (new_product, language, long, spam) for the same
customers. ``--share`` of the requests are shifted, in random order. Concurrent clients.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIELDS = ("subject", "body", "channel", "customer_id")


def tickets(source, n: int, shift: str | None, share: float, seed: int) -> list[dict]:
    """``n`` request bodies: ``share`` shifted, the rest ordinary unseen tickets."""
    from components import generate

    shifted_n = round(n * share) if shift else 0
    ordinary = generate.generate(n_tickets=source.n_tickets + n - shifted_n, n_customers=source.n_customers,
                                 seed=source.seed).tickets.iloc[source.n_tickets:]
    rows = ordinary.to_dict("records")
    if shifted_n:
        rows += generate.generate(n_tickets=shifted_n, n_customers=source.n_customers, seed=source.seed,
                                  shift=shift).tickets.to_dict("records")
    random.Random(seed).shuffle(rows)
    return [{k: r[k] for k in FIELDS} | {"ticket_id": r["ticket_id"]} for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--shift", choices=["new_product", "language", "long", "spam"], default=None)
    parser.add_argument("--share", type=float, default=1.0, help="share of shifted requests (with --shift)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    from llmops.spec import load_spec

    spec = load_spec(args.spec.resolve(), [])
    _, pipe = spec.pipeline(None)
    source = pipe.ingest.source
    if getattr(source, "kind", None) != "generate":
        sys.exit("ingest.source is not the demo generator: this traffic would not match the training data")
    bodies = tickets(source, args.n, args.shift, args.share, args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=args.url, headers=headers, timeout=300)

    def send(body: dict) -> tuple[int, float]:
        started = time.perf_counter()
        r = client.post("/v1/triage", json={k: v for k, v in body.items() if k != "ticket_id"})
        return r.status_code, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(send, bodies))
    elapsed = time.perf_counter() - started
    kinds = Counter("shifted" if "-" in b["ticket_id"][4:] else "ordinary" for b in bodies)
    print(f"{len(bodies)} requests ({dict(kinds)}{f', shift {args.shift}' if args.shift else ''}) to {args.url} "
          f"in {elapsed:.1f} s with {args.clients} clients: statuses {dict(Counter(s for s, _ in results))}, "
          f"latency p50 {1000 * statistics.median(t for _, t in results):,.0f} ms")


if __name__ == "__main__":
    main()
