"""Benchmark: online context lookup (profile + top-5 articles) and vector-store recall.

    .venv/bin/python bench/online_context.py [--queries 1000]

Builds a feature store from the demo data in a temporary folder (not timed), then:
- times ``online_context`` (online profile from Feast + top-5 retrieval + prompt) for
  each of N held-out tickets, one at a time as an endpoint would: p50/p99 in ms;
- compares the vector store's top-5 with exact brute-force cosine over the same article
  vectors: recall@5 = |store top-5 & exact top-5| / 5, averaged over the queries.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from components import features, generate  # noqa: E402
from components.base import StageIO  # noqa: E402
from components.prepare import PrepareSpec, ticket_text  # noqa: E402
from llmops.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    spec = load_spec(ROOT / "pipelines.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = root / "feature_repo"
        shutil.copytree(ROOT / "feature_repo", repo, ignore=shutil.ignore_patterns("__pycache__"))
        data = generate.generate()
        data.write(root / "validate")
        (root / "features").mkdir()
        io = StageIO(pipeline="bench", out_dir=root / "features", inputs={"validate": root / "validate"},
                     state_dir=root / "state", models=dict(spec.models), feature_repo=repo)
        cfg = features.FeaturesSpec(top_k=5)
        features.run(cfg, io)
        store = features.open_store(repo, io.state_dir, io.pipeline)
        embedder = features.Embedder(cfg.embedding_model, io.models, io.state_dir)
        retriever = features.Retriever(store, embedder, top_k=5)
        # Held-out traffic: other tickets than the ones the store was built from.
        live = generate.generate(n_tickets=args.queries, seed=99).tickets.to_dict("records")
        online_context = features.online_context
        online_context(store, retriever, cfg, PrepareSpec(), live[0])  # warm-up (loads, caches)
        latencies = []
        for ticket in live:
            t0 = time.perf_counter()
            online_context(store, retriever, cfg, PrepareSpec(), ticket)
            latencies.append((time.perf_counter() - t0) * 1000)
        table = pd.read_parquet(root / "features" / "article_embeddings.parquet")
        vectors = np.stack(table.embedding.values)
        texts = [ticket_text(t) for t in live]
        found = retriever.search(texts)
        queries = embedder.encode(texts)
        recalls = []
        for q, hits in zip(queries, found):
            exact = set(table.article_id.values[np.argsort(-(vectors @ q))[:5]])
            recalls.append(len(exact & {h["article_id"] for h in hits}) / 5)
        gold = [t["article_id"] in {h["article_id"] for h in hits} for t, hits in zip(live, found)]
    print(json.dumps({
        "benchmark": "online_context", "queries": args.queries,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "mean_ms": round(float(np.mean(latencies)), 1),
        "recall_at_5_vs_brute_force": round(float(np.mean(recalls)), 4),
        "gold_article_recall_at_5": round(float(np.mean(gold)), 4),
        "articles": int(len(table)), "index": "Milvus Lite FLAT, cosine", "cpus": os.cpu_count(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))


if __name__ == "__main__":
    main()
