"""Benchmark: the validate stage on 100,000 tickets (target: under 60 s on 2 cores).

    .venv/bin/python bench/validate_100k.py [--n 100000]

Generates the tickets once (not timed), then times the whole stage: reading the tables,
token counts with the base model's tokenizer, every Great Expectations check, Data Docs,
and writing the outputs. Prints one JSON line with the figures and the CPU's flags; exits
1 when the stage took longer than the target, 2 when the base model's tokenizer is not
provisioned (run `llmops models pull` first).

Expected duration with the defaults, on 2 cores: about 2 min (generating 100,000 tickets
~1.5 min, the stage ~15-20 s before the near-duplicate check, which adds ~18 s of CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_S = 60


def main() -> int:
    from components import generate
    from components.base import StageIO
    from components.catalog import ModelError, pull
    from components.compress.measure import cpu_flags
    from components.validate import run
    from llmops.spec import load_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="tickets to validate")
    args = parser.parse_args()
    spec = load_spec(ROOT / "pipelines.yaml")
    pipe = spec.pipelines[spec.default_pipeline]
    tokenizer = pipe.validate_.checks.text.tokenizer
    if tokenizer in spec.models:
        try:
            pull(tokenizer, spec.models[tokenizer], spec.state_dir(ROOT))
        except ModelError as exc:
            print(f"{exc}\nthe token-count check needs the base model's tokenizer: run `llmops models pull` "
                  "(or `make models`) first", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = generate.generate(n_tickets=args.n, n_customers=max(300, args.n // 30), seed=11)
        data.write(Path(tmp) / "ingest")
        gen_s = time.perf_counter() - t0
        io = StageIO(pipeline="bench", out_dir=Path(tmp) / "validate", inputs={"ingest": Path(tmp) / "ingest"},
                     state_dir=spec.state_dir(ROOT), models=dict(spec.models),
                     sections={"prepare": pipe.prepare, "task": pipe.task})
        io.out_dir.mkdir()
        # quarantine: at this size template texts repeat across splits, and the leakage check
        # finds them; quarantining times the whole path instead of stopping at the first report.
        cfg = pipe.validate_.model_copy(update={"on_fail": "quarantine"})
        t1 = time.perf_counter()
        result = run(cfg, io)
        seconds = time.perf_counter() - t1
    report = result.report
    print(json.dumps({"benchmark": "validate", "tickets": args.n, "seconds": round(seconds, 1),
                      "tickets_per_s": round(args.n / seconds), "target_s": TARGET_S,
                      "within_target": seconds < TARGET_S, "generate_s": round(gen_s, 1),
                      "expectations": report.expectations, "failed_errors": report.failed_errors,
                      "quarantined": report.quarantined, "cpus": os.cpu_count(), "cpu_flags": cpu_flags()}))
    return 0 if seconds < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
