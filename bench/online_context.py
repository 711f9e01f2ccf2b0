"""Benchmark: online context lookup (profile + top-5 articles + prompt) and vector-store recall.

    .venv/bin/python bench/online_context.py [--queries 1000]

Builds a feature store from the demo data in a temporary folder (not timed): the features
stage with the default pipeline's features section (top_k 5), its Feast repository and
embedding model. Then:
- times ``online_context`` (online features from Feast + top-5 retrieval + the task's
  prompt) for each of N held-out tickets, one at a time as an endpoint would: p50/p99 in ms;
- compares the vector store's top-5 with exact brute-force cosine over the same article
  vectors: recall@5 = |store top-5 & exact top-5| / 5, averaged over the queries.
Prints one JSON line (with the CPU's flags). No target is checked: exits 0 unless it fails.

Expected duration with the defaults, on 2 cores: about 1 min (building the store ~20 s,
1,000 lookups at ~20 ms, the recall pass ~10 s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

TOP_K = 5


def main() -> int:
    import numpy as np
    import pandas as pd

    from components import features, generate
    from components.base import StageIO
    from components.compress.measure import cpu_flags
    from components.featurestore import Embedder, Retriever, online_context, open_store
    from components.task import query_text
    from llmops.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    spec = load_spec(ROOT / "pipelines.yaml")
    pipe = spec.pipelines[spec.default_pipeline]
    cfg = pipe.features.model_copy(update={"top_k": TOP_K})
    task = pipe.task
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = root / "feature_repo"
        shutil.copytree(ROOT / spec.services.feast.repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
        generate.generate().write(root / "validate")
        (root / "features").mkdir()
        io = StageIO(pipeline="bench", out_dir=root / "features", inputs={"validate": root / "validate"},
                     state_dir=root / "state", models=dict(spec.models), feature_repo=repo)
        features.run(cfg, io)
        store = open_store(repo, io.state_dir, io.pipeline)
        embedder = Embedder(cfg.embedding_model, io.models, io.state_dir, cfg.batch_size)
        retriever = Retriever(store, embedder, top_k=TOP_K)
        # Held-out traffic: other tickets than the ones the store was built from.
        live = generate.generate(n_tickets=args.queries, seed=99).tickets.to_dict("records")
        online_context(store, retriever, cfg, task, live[0])  # warm-up (loads, caches)
        latencies = []
        for ticket in live:
            t0 = time.perf_counter()
            online_context(store, retriever, cfg, task, ticket)
            latencies.append((time.perf_counter() - t0) * 1000)
        table = pd.read_parquet(root / "features" / "article_embeddings.parquet")
        vectors = np.stack(table.embedding.values)
        texts = [query_text(t, task) for t in live]
        found = retriever.search(texts)
        queries = embedder.encode(texts)
        recalls = []
        for q, hits in zip(queries, found):
            exact = set(table.article_id.values[np.argsort(-(vectors @ q))[:TOP_K]])
            recalls.append(len(exact & {h["article_id"] for h in hits}) / TOP_K)
        gold = [t["article_id"] in {h["article_id"] for h in hits} for t, hits in zip(live, found)]
    print(json.dumps({
        "benchmark": "online_context", "queries": args.queries,
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "mean_ms": round(float(np.mean(latencies)), 1),
        f"recall_at_{TOP_K}_vs_brute_force": round(float(np.mean(recalls)), 4),
        f"gold_article_recall_at_{TOP_K}": round(float(np.mean(gold)), 4),
        "articles": int(len(table)), "index": "Milvus Lite FLAT, cosine", "cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(), "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
