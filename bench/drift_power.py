"""Detection power and false alarms of `llmops monitor`'s signals, measured on windows of
generated traffic against the champion's own training prompts.

    .venv/bin/python bench/drift_power.py                      # the default grid (long)
    .venv/bin/python bench/drift_power.py --sizes 300 1000 --shares 0.25 0.5 --reps 10 --null-reps 100

Traffic: pools of requests built as the endpoint builds them (the same Triage context:
the customer's online features through the feature server, the top-k articles and their
similarity, the version's prompt): ordinary tickets the pipeline never trained on (the
generator's tickets after ``ingest.source.n_tickets``) and, per shift kind (new_product,
language, long, spam), shifted tickets for the same customers. Generating answers for
thousands of requests would take hours on 2 cores, so a request's "answer" here is its
gold label (the answer_labels signal then measures the label mix, not the model; every
other content signal reads exactly what the endpoint logs). Windows: ``share`` of
``size`` requests drawn from a shift pool, the rest from the ordinary pool (without
replacement within a window), ``reps`` windows per cell, and ``null-reps`` windows of
ordinary traffic only per size. Prints per signal and for the alert rule (any signal) the
share of windows that drifted, and writes the rows as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("new_product", "language", "long", "spam")
CONTENT = ("prompt_tokens", "unseen_words", "frequent_words", "embeddings", "answer_labels", "retrieval_similarity")


def build_pool(triage, tickets, model_id: str, count) -> list[dict]:
    """Request-log records of ``tickets`` as /v1/triage logs them (gold labels as answers)."""
    from components.task import answer_json

    records = []
    for t in tickets.to_dict("records"):
        ctx = triage.context(t, None)
        records.append({"route": "/v1/triage", "model": model_id, "status": 200, "latency_ms": 1000.0,
                        "messages": ctx["messages"], "prompt_tokens": count(ctx["messages"]), "valid": True,
                        "answer": answer_json(t, triage.task),
                        "articles": [{"article_id": a["article_id"], "score": a["score"]} for a in ctx["articles"]]})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--reps", type=int, default=20, help="windows per (kind, share, size)")
    parser.add_argument("--null-reps", type=int, default=100, help="unshifted windows per size")
    parser.add_argument("--ordinary", type=int, default=2000, help="ordinary pool size")
    parser.add_argument("--shifted", type=int, default=600, help="pool size per shift kind")
    parser.add_argument("--pools", type=Path, default=Path("/tmp/llmops-drift-pools.json"), help="cache of the pools")
    parser.add_argument("--out", type=Path, default=Path("/tmp/llmops-drift-power.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from bench.common import triage_or_exit
    from components import featureserver, generate
    from components.lm import prompt_ids
    from components.monitor.reference import find_reference
    from components.monitor.signals import compute, reference_frame, window_frame
    from llmops.monitoring import monitor_folder, served_version
    from llmops.runner import configure_environment
    from llmops.spec import load_spec

    root = args.spec.resolve().parent
    spec = load_spec(args.spec.resolve(), [])
    name, pipe = spec.pipeline(None)
    configure_environment(spec, root)
    served = served_version(spec, root, name, None)
    ref = find_reference(served.manifest, pipe.monitor.reference_split, monitor_folder(spec, root, name) / "reference",
                         spec.artifacts_dir(root) / name / "prepare", served.run_id)

    def count(messages):
        return len(prompt_ids([m for m in messages if m.get("role") != "assistant"], served.tokenizer))

    source = pipe.ingest.source
    pools: dict[str, list[dict]] = {}
    if args.pools.exists():
        pools = json.loads(args.pools.read_text())
        if (pools.get("model") != served.id or len(pools.get("ordinary", [])) < args.ordinary
                or any(len(pools.get(k, [])) < args.shifted for k in args.kinds)):
            pools = {}
    if not pools:
        triage = triage_or_exit(spec, root, name, pipe, served)
        started = time.perf_counter()
        try:
            ordinary = generate.generate(n_tickets=source.n_tickets + args.ordinary, n_customers=source.n_customers,
                                         seed=source.seed).tickets.iloc[source.n_tickets:]
            pools = {"model": served.id, "ordinary": build_pool(triage, ordinary, served.id, count)}
            for kind in args.kinds:
                shifted = generate.generate(n_tickets=args.shifted, n_customers=source.n_customers, seed=source.seed,
                                            shift=kind).tickets
                pools[kind] = build_pool(triage, shifted, served.id, count)
        finally:
            if triage.started_server:
                featureserver.stop(spec.state_dir(root), name)
        args.pools.write_text(json.dumps(pools))
        print(f"pools built in {time.perf_counter() - started:.0f} s: "
              + ", ".join(f"{k} {len(v)}" for k, v in pools.items() if k != "model"))

    from components.featurestore import Embedder
    from components.monitor.embeddings import bf16_supported, encoder
    from components.monitor.reference import request_text

    embedder = Embedder(served.manifest["prompt"].get("embedding_model") or pipe.features.embedding_model,
                        spec.models, spec.state_dir(root))
    texts = sorted({request_text(r["messages"]) for k, v in pools.items() if k != "model" for r in v} | set(ref.texts))
    started = time.perf_counter()
    vectors = encoder(embedder, pipe.monitor.signals.embeddings.bf16 and bf16_supported())(texts)  # as the monitor does
    index = {t: i for i, t in enumerate(texts)}
    print(f"embedded {len(texts):,} texts in {time.perf_counter() - started:.0f} s")

    def embed(batch, side):
        return vectors[[index[t] for t in batch]]

    reference = reference_frame(ref, count)
    cfg = pipe.monitor.signals
    rng = np.random.default_rng(args.seed)
    rows = []

    def judge(window: list[dict], kind: str, share: float, size: int) -> None:
        current = window_frame(window, count, served.schema.parse)
        started = time.perf_counter()
        results, _ = compute(cfg, current, reference, ref.texts, embed, int(rng.integers(1 << 30)))
        drifted = {r.name: r.drifted for r in results if r.name in CONTENT}
        rows.append({"kind": kind, "share": share, "size": size, "seconds": time.perf_counter() - started,
                     "drifted": drifted, "any": any(drifted.values()),
                     "values": {r.name: r.value for r in results if r.name in CONTENT}})

    def draw(pool: list[dict], n: int) -> list[dict]:
        return [pool[i] for i in rng.choice(len(pool), n, replace=n > len(pool))]

    for size in args.sizes:
        for _ in range(args.null_reps):
            judge(draw(pools["ordinary"], size), "none", 0.0, size)
        for kind in args.kinds:
            for share in args.shares:
                shifted = round(size * share)
                for _ in range(args.reps):
                    judge(draw(pools["ordinary"], size - shifted) + draw(pools[kind], shifted), kind, share, size)
        print(f"size {size}: done ({len(rows)} windows so far)", flush=True)
    args.out.write_text(json.dumps(rows, indent=1))
    report(rows)


def report(rows: list[dict]) -> None:
    cells = defaultdict(list)
    for r in rows:
        cells[(r["kind"], r["share"], r["size"])].append(r)
    print("\n| traffic | share | window | windows | " + " | ".join(CONTENT) + " | any (alert) | s/window |")
    print("|---|---|---|---|" + "---|" * (len(CONTENT) + 2))
    for (kind, share, size), got in sorted(cells.items(), key=lambda c: (c[0][0] != "none", c[0])):
        rate = {s: np.mean([g["drifted"].get(s, False) for g in got]) for s in CONTENT}
        print(f"| {kind} | {share:.0%} | {size} | {len(got)} | " + " | ".join(f"{rate[s]:.2f}" for s in CONTENT)
              + f" | **{np.mean([g['any'] for g in got]):.2f}** | {np.mean([g['seconds'] for g in got]):.1f} |")


if __name__ == "__main__":
    main()
