"""evaluate: the fine-tuned model against the base model on the test split.

Both models answer every test chat greedily (deterministic), in batches of similar length;
answers are scored against the task's answer schema (components/task.py): validity,
accuracy per answer field, exact match (every field right), exact match per slice, and the
confusion of the first answer field. With a ``phrasing`` slice (the demo data's), the
report puts exact match on in-distribution chats beside that on chats worded in a phrasing
no training chat uses (prepare holds them out for the test split). Also measured: perplexity of the gold answers, the
candidate's latency one request at a time (p50/p95) and its batched tokens/s.

Fastest exact path: a row stops generating as soon as its text can no longer become a
valid answer (the base model answers in prose: one token decides), which changes no score.
The base model's result depends only on its weights, the test split and these settings,
so it is cached under ``<state_dir>/cache/evaluate/`` by their hashes and reused.
"""
from __future__ import annotations

import hashlib
import json

from pydantic import Field

from components import tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table, write_json
from components.catalog import ModelError, base_model_path, weights_sha256
from components.lm import load
from components.measure import Measured, measure
from components.reports import EvaluationReport, ModelMetrics
from components.splits import read_examples
from components.stats import interval_text, latency_text
from components.task import AnswerSchema

OUTPUTS = ("predictions.jsonl", "confusion.csv", "report.md")
CACHE_VERSION = 3  # bump when the scoring or the generation changes
PHRASING = {"seen": "in-distribution", "unseen": "unseen phrasing"}  # the phrasing slice's values, in words


class EvaluateSpec(StrictModel):
    batch_size: int = Field(16, gt=0)  # chats generated together
    max_new_tokens: int = Field(48, gt=0)  # the answer is ~25 tokens; a model that rambles is cut here
    max_examples: int | None = Field(None, gt=0)  # first N test chats only; null: all
    # Chats answered one at a time for the latency figures: p50 needs 2, p95 needs 20 (fewer:
    # the slowest is reported as max of n).
    latency_requests: int = Field(20, ge=0)
    perplexity_examples: int | None = Field(64, gt=0)  # first N chats for the gold answers' perplexity; null: all
    cache_base: bool = True  # reuse the base model's result when weights, test set and settings match


def run(cfg: EvaluateSpec, io: StageIO) -> StageResult:
    """Evaluate the fine-tuned adapter and the base model on prepare's test split."""
    base_path = base_model_path(io)
    test_path = io.inputs["prepare"] / "test.jsonl"
    schema = AnswerSchema.read(io.inputs["prepare"] / AnswerSchema.FILE)
    examples = read_examples(test_path)[:cfg.max_examples]
    if not examples:
        raise StageError(f"{test_path}: no test examples")
    slice_by = sorted({k for e in examples for k in e.get("meta", {})})  # prepare's slice_by
    try:
        tokenizer, model = load(base_path, adapter=io.inputs["finetune"] / "adapter")
    except ModelError as exc:
        raise StageError(str(exc)) from exc
    candidate = measure(model, tokenizer, examples, schema, cfg.batch_size, cfg.max_new_tokens,
                        cfg.latency_requests, slice_by, label="evaluate candidate",
                        perplexity_examples=cfg.perplexity_examples)
    del model

    base_sha = weights_sha256(base_path, io.state_dir)
    test_sha = file_sha256(test_path)
    settings = cfg.model_dump(exclude={"cache_base", "latency_requests"}) | {"version": CACHE_VERSION,
                                                                               "schema": schema.schema,
                                                                               "slices": slice_by}
    key = json.dumps({"base": base_sha, "test": test_sha, "settings": settings}, sort_keys=True)
    cache_file = io.state_dir / "cache" / "evaluate" / f"base-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    fresh = not (cfg.cache_base and cache_file.exists())
    if not fresh:
        cached = json.loads(cache_file.read_text())
        base = Measured(ModelMetrics.model_validate(cached["metrics"]), cached["answers"], cached["slices"])
    else:
        base_tok, base_model = load(base_path)
        base = measure(base_model, base_tok, examples, schema, cfg.batch_size, cfg.max_new_tokens, 0, slice_by,
                       label="evaluate base model", perplexity_examples=cfg.perplexity_examples)
        del base_model
        write_json(cache_file, {"metrics": base.metrics.model_dump(), "slices": base.slices,
                                "answers": base.answers})

    first = schema.fields[0]
    golds = [e["labels"] for e in examples]
    with open(io.out_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for e, a, b in zip(examples, candidate.answers, base.answers):
            fh.write(json.dumps({"ticket_id": e.get("ticket_id"), "gold": e["labels"], "candidate": a, "base": b,
                                 "exact_match": schema.parse(a) == e["labels"]}, ensure_ascii=False) + "\n")
    counts = schema.confusion(golds, candidate.answers, first)
    with open(io.out_dir / "confusion.csv", "w", encoding="utf-8") as fh:
        fh.write("actual,predicted\n")  # one row per example: DVC's confusion template counts them
        for (gold, pred), k in sorted(counts.items()):
            fh.write(f"{gold},{pred}\n" * k)

    c, b = candidate.metrics, base.metrics
    report = EvaluationReport(candidate=c, base=b, base_cached=not fresh,
                              exact_match_gain=round(c.exact_match - b.exact_match, 4),
                              slices={"candidate": candidate.slices, "base": base.slices},
                              base_model_sha256=base_sha, test_sha256=test_sha)
    summary = render(report, len(examples), counts, first)
    (io.out_dir / "report.md").write_text(summary + "\n", encoding="utf-8")
    tracking.log_dataset(test_path, test_sha, f"{io.pipeline}-test", "evaluation", rows=len(examples))
    for name in OUTPUTS:
        tracking.log_artifacts(io.out_dir / name, "evaluate")
    return StageResult(outputs={"predictions": io.out_dir / "predictions.jsonl",
                                "confusion": io.out_dir / "confusion.csv", "report": io.out_dir / "report.md"},
                       report=report, summary=summary)


def by_phrasing(report: EvaluationReport) -> str:
    """'in-distribution 0.912 [0.864, 0.943] (190 chats; base 0.000), unseen phrasing 0.560
    [0.462, 0.653] (100 chats; base 0.000)' from the phrasing slice (95% Wilson intervals);
    '' when the test split has no such slice."""
    cand, base = ({} if m not in report.slices else report.slices[m].get("phrasing", {}) for m in ("candidate", "base"))
    return ", ".join(f"{PHRASING[v]} {cand[v]['exact_match']:.3f} {interval_text(cand[v].get('exact_match_ci'))} "
                     f"({int(cand[v]['n'])} chats; base {base[v]['exact_match']:.3f})".replace("  ", " ")
                     for v in PHRASING if v in cand and v in base)


def render(report: EvaluationReport, n: int, counts, field: str) -> str:
    c, b = report.candidate, report.base
    rates = ["exact_match", "json_valid_rate", *(f"{f}_accuracy" for f in c.field_accuracy)]
    others = ["perplexity", "latency_requests", "latency_p50_ms", "latency_p95_ms", "latency_max_ms",
              "generated_tokens_per_s"]
    table = [{"metric": k, "candidate": c.flat().get(k, ""), "candidate 95% CI": interval_text(c.interval(k)),
              "base": b.flat().get(k, ""), "base 95% CI": interval_text(b.interval(k))} for k in rates]
    table += [{"metric": k, "candidate": c.flat().get(k, ""), "candidate 95% CI": "", "base": b.flat().get(k, ""),
               "base 95% CI": ""} for k in others]
    slice_rows = [{"slice": f"{f}={value}", "n": int(m["n"]), "candidate EM": m["exact_match"],
                   "candidate 95% CI": interval_text(m.get("exact_match_ci")),
                   "base EM": report.slices["base"][f][value]["exact_match"]}
                  for f, values in report.slices["candidate"].items() for value, m in values.items()]
    golds = sorted({g for g, _ in counts})
    predicted = golds + sorted({p for _, p in counts if p not in golds})
    matrix = [{"actual \\ predicted": g, **{p: counts.get((g, p), 0) for p in predicted}} for g in golds]
    return (f"### evaluate\n{n} test chats, greedy decoding; base model result "
            f"{'from cache' if report.base_cached else 'computed'}. Intervals: 95% Wilson score intervals "
            f"of each rate over its n chats. Latency: {latency_text(c.latency())}, one request at a time."
            + (f" Exact match by phrasing: {by_phrasing(report)}." if by_phrasing(report) else "")
            + "\n\n" + markdown_table(table)
            + ("\n\n**Exact match by slice**\n\n" + markdown_table(slice_rows) if slice_rows else "")
            + f"\n\n**{field} confusion (candidate)**\n\n" + markdown_table(matrix))
