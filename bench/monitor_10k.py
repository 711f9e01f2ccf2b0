"""How long `llmops monitor` takes on a window of 10,000 logged requests (target: 60 s on
2 cores), end to end and per phase.

    .venv/bin/python bench/monitor_10k.py --spec pipelines.yaml             # build the log once, then time
    .venv/bin/python bench/monitor_10k.py --spec pipelines.yaml --cli       # also the whole `llmops monitor`

The log: ``--n`` ordinary tickets the pipeline never trained on (the generator's tickets
after ``ingest.source.n_tickets``), written as /v1/triage logs them (the Triage context:
the customer's online features, the top-k articles, the version's prompt; answers are the
gold labels, as in bench/drift_power.py) into ``--log`` (kept: built once; 412 s for
10,000 on 2 cores). The phases are timed in one process as components/monitor/job.py runs
them, into ``<log>-monitor`` (emptied first): cold, nothing kept, then warm, the same
window with its embeddings kept; ``--cli`` times the command itself, Prefect flow and
MLflow logging included, pointing ``monitor.log`` at that folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_S = 60


def build_log(spec, root: Path, name: str, pipe, served, folder: Path, n: int, count) -> None:
    """``n`` request-log records of unseen ordinary tickets in ``folder`` (one file per hour)."""
    from bench.common import triage_or_exit
    from components import featureserver, generate
    from components.featurestore import online_features
    from components.task import answer_json, build_messages, query_text

    source = pipe.ingest.source
    triage = triage_or_exit(spec, root, name, pipe, served)
    started = time.perf_counter()
    try:
        tickets = generate.generate(n_tickets=source.n_tickets + n, n_customers=source.n_customers,
                                    seed=source.seed).tickets.iloc[source.n_tickets:].to_dict("records")
        # Triage.context per ticket, its two lookups batched: features once per customer, one search call
        key = triage.features.entity_key
        features = {c: online_features(triage.store, triage.online, triage.features, c, triage.service)
                    for c in sorted({str(t[key]) for t in tickets})}
        articles = (triage.retriever.search([query_text(t, triage.task) for t in tickets])
                    if triage.retriever is not None and triage.task.uses_retrieval() else [[] for _ in tickets])
    finally:
        if triage.started_server:
            featureserver.stop(spec.state_dir(root), name)
    first = datetime.now(timezone.utc) - timedelta(hours=2)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str]] = {}
    for i, (t, found) in enumerate(zip(tickets, articles)):
        messages = build_messages({**t, **features[str(t[key])]}, triage.task, found)
        at = first + timedelta(seconds=0.5 * i)
        record = {"request_id": f"triage-{i:06d}", "route": "/v1/triage", "model": served.id, "status": 200,
                  "time": at.isoformat(timespec="milliseconds"), "latency_ms": 1000.0, "messages": messages,
                  "prompt_tokens": count(messages), "valid": True, "answer": answer_json(t, triage.task),
                  "articles": [{"article_id": a["article_id"], "score": a["score"]} for a in found]}
        files.setdefault(f"requests-{at:%Y%m%dT%H}.jsonl", []).append(json.dumps(record))
    for file, lines in files.items():
        (folder / file).write_text("\n".join(lines) + "\n")
    print(f"log of {n:,} requests built in {time.perf_counter() - started:.0f} s: {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "pipelines.yaml")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--log", type=Path, default=Path("/tmp/llmops-monitor-10k/requests"))
    parser.add_argument("--cli", action="store_true", help="also time the whole `llmops monitor --last N`")
    args = parser.parse_args()

    from components.featurestore import Embedder
    from components.lm import prompt_ids
    from components.monitor import job
    from llmops.monitoring import served_version
    from llmops.runner import configure_environment
    from llmops.spec import load_spec

    root = args.spec.resolve().parent
    spec = load_spec(args.spec.resolve(), [f"monitor.window.last_requests={args.n}", f"monitor.log={args.log}"])
    name, pipe = spec.pipeline(None)
    configure_environment(spec, root)
    served = served_version(spec, root, name, None)

    def count(messages):
        return len(prompt_ids([m for m in messages if m.get("role") != "assistant"], served.tokenizer))

    if not any(args.log.glob("requests-*.jsonl")):
        build_log(spec, root, name, pipe, served, args.log, args.n, count)
    embedding_model = served.manifest.get("prompt", {}).get("embedding_model") or pipe.features.embedding_model
    out = Path(f"{args.log}-monitor")
    shutil.rmtree(out, ignore_errors=True)  # cold: no kept reference, no kept embeddings
    for label in ("cold", "warm"):
        phases: list[str] = []
        started = time.perf_counter()
        summary = job.run(pipe.monitor, served, str(args.log), out, spec.artifacts_dir(root) / name / "prepare",
                          lambda: Embedder(embedding_model, spec.models, spec.state_dir(root)),
                          say=phases.append, embedding_model=embedding_model)
        seconds = time.perf_counter() - started
        print(f"{label}: {summary['window']['requests']:,} requests judged in {seconds:.1f} s "
              f"(target {TARGET_S} s: {'met' if seconds <= TARGET_S else 'NOT met'}); "
              "phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["timings"].items()))
    if args.cli:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "llmops", "monitor", "-f", str(args.spec.resolve()),
                               "--last", str(args.n), "--set", f"monitor.log={args.log}"], cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode not in (0, 3):
            sys.exit(done.stdout[-2000:] + done.stderr[-2000:])
        seconds = time.perf_counter() - started
        print(f"llmops monitor --last {args.n}: {seconds:.1f} s (exit {done.returncode}; target {TARGET_S} s: "
              f"{'met' if seconds <= TARGET_S else 'NOT met'})")


if __name__ == "__main__":
    main()
