"""Benchmark: the validate stage on 100,000 tickets (target: under 60 s on 2 cores).

    .venv/bin/python bench/validate_100k.py [--n 100000]

Generates the tickets once (not timed), then times the whole stage: reading the tables,
token counts with the base model's tokenizer, every Great Expectations check, Data Docs,
and writing the outputs. Prints one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from components import generate  # noqa: E402
from components.base import StageIO  # noqa: E402
from components.catalog import pull  # noqa: E402
from components.validate import run  # noqa: E402
from llmops.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="tickets to validate")
    args = parser.parse_args()
    spec = load_spec(ROOT / "pipelines.yaml")
    pull("smollm2-135m-instruct", spec.models["smollm2-135m-instruct"], spec.state_dir(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = generate.generate(n_tickets=args.n, n_customers=max(300, args.n // 30), seed=11)
        data.write(Path(tmp) / "ingest")
        gen_s = time.perf_counter() - t0
        pipe = spec.pipelines[spec.default_pipeline]
        io = StageIO(pipeline="bench", out_dir=Path(tmp) / "validate", inputs={"ingest": Path(tmp) / "ingest"},
                     state_dir=spec.state_dir(ROOT), models=dict(spec.models), sections={"prepare": pipe.prepare})
        io.out_dir.mkdir()
        t1 = time.perf_counter()
        # quarantine: at this size template texts repeat across splits, and the leakage check
        # finds them; quarantining times the whole path instead of stopping at the first report.
        cfg = pipe.validate_.model_copy(update={"on_fail": "quarantine"})
        result = run(cfg, io)
        seconds = time.perf_counter() - t1
    print(json.dumps({"benchmark": "validate", "tickets": args.n, "seconds": round(seconds, 1),
                      "tickets_per_s": round(args.n / seconds), "target_s": 60, "within_target": seconds < 60,
                      "generate_s": round(gen_s, 1), "expectations": result.metrics["expectations"],
                      "failed_errors": result.metrics["failed_errors"], "quarantined": result.metrics["quarantined"],
                      "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
