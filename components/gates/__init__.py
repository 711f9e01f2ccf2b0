"""gates: every gate declared in ``pipelines.yaml`` on the fine-tuned model, one report.

The kinds (kinds.py, ``kind:`` in the spec): ``absolute`` (a metric within min/max; or
the exact match of one slice of the test split, e.g. ``slice: phrasing=unseen``),
``vs_base`` (a gain over the base model), ``vs_champion`` (no regression against the
registry's champion on the same test split: its recorded metrics when its test split has
the same SHA-256, else it is evaluated again here), ``budget`` (latency, tokens/s, size,
cost of the variant that will be served: compress's choice, or the fine-tuned model), and
the probed kinds ``invariance``, ``directional``, ``minimum_functionality`` and ``safety``
(a pass rate over probes built from test chats, answered in one batch).

Each gate's row has the observed value, the threshold, the margin (>= 0 passes: exactly at
the threshold passes) and pass/fail. A failed gate does not fail this stage: the report is
its product; ``promote`` acts on it.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from pydantic import Field, field_validator

from components import tracking
from components.base import StageError, StageIO, StageResult, StrictModel, file_sha256, markdown_table, write_json
from components.catalog import ModelError, base_model_path, weights_sha256
from components.gates.kinds import (PROBED, AbsoluteGate, Evidence, Gate, ProbeContext, SafetyGate, VsBaseGate,
                                    VsChampionGate, is_rate)
from components.lm import generate, load, prompt_ids, size_mib
from components.measure import PREDICTIONS, measure, outcomes_by_chat, read_answers
from components.reports import CompressReport, EvaluationReport, GateReport, ModelMetrics, Operational
from components.splits import read_examples
from components.stats import Paired, paired
from components.task import AnswerSchema, TaskSpec, build_messages, cannot_be_answer

OUTPUTS = ("report.md",)
CACHE_VERSION = 3  # bump when what a re-evaluation caches changes


class GatesSpec(StrictModel):
    checks: dict[str, Gate] = Field(default_factory=lambda: {
        "json_valid": AbsoluteGate(metric="json_valid_rate", min=0.99),
        "beats_base": VsBaseGate(metric="exact_match", min_gain=0.1),
        "no_regression": VsChampionGate(metric="exact_match", max_regression=0.02),
        "safety": SafetyGate()}, min_length=1)
    probe_examples: int = Field(8, gt=0)  # test chats each behavioural/safety gate builds its probes from
    batch_size: int = Field(16, gt=0)  # probe chats generated together
    max_new_tokens: int = Field(48, gt=0)  # as in evaluate
    hourly_price_usd: float = Field(1.0, ge=0)  # price of the serving machine, for cost per 1,000 requests

    @field_validator("checks")
    @classmethod
    def _names(cls, checks: dict) -> dict:
        bad = [n for n in checks if not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"gate names may use letters, digits, _ and - only (got {', '.join(map(repr, bad))})")
        return checks


def check_all(checks: dict, ev: Evidence, test_sha256: str = "", model_name: str = "") -> GateReport:
    """The gate report: a row per gate, passed when every gate passed."""
    rows = [gate.check(name, ev) for name, gate in checks.items()]
    failed = [r.gate for r in rows if not r.passed]
    return GateReport(status="failed" if failed else "passed", failed=failed, gates=rows,
                      champion=ev.champion_note, operational=ev.operational, test_sha256=test_sha256,
                      model_name=model_name)


# ---------------------------------------------------------------- evidence

def cost_per_1k_requests(hourly_price: float, seconds_per_request: float) -> float:
    """USD per 1,000 requests served one at a time: price/hour / 3600 s x s/request x 1000."""
    return hourly_price / 3600 * seconds_per_request * 1000


def operational(candidate: ModelMetrics, compressed: CompressReport | None, weights: list[Path],
                hourly_price: float) -> Operational:
    """Latency, tokens/s, size (MiB) and cost of the served variant: compress's chosen
    variant when the pipeline compresses, else the fine-tuned model (base weights + adapter)
    as evaluate measured it. Latency keeps its count: p95 only from 20 requests or more,
    p50 from 2 (components/stats.py); cost uses the median request latency at batch 1 (the
    slowest request when the median is not claimed)."""
    if compressed is not None:
        v = compressed.served
        timed, tps, size = v.latency(), v.tokens_per_s_batched, v.size_mib
        source = f"compress variant {compressed.chosen!r}"
    else:
        if not candidate.latency_requests:
            raise StageError("evaluate measured no latency (evaluate.latency_requests is 0); budget gates need it")
        timed, tps = candidate.latency(), candidate.generated_tokens_per_s
        size, source = sum(size_mib(p) for p in weights), "fine-tuned model (base weights + adapter)"
    per_request_ms = timed.p50_or_max()
    return Operational(source=source, latency_requests=timed.requests, latency_p50_ms=timed.p50_ms,
                       latency_p95_ms=timed.p95_ms, latency_max_ms=timed.max_ms, tokens_per_s=tps,
                       size_mib=round(size, 1), hourly_price_usd=hourly_price,
                       cost_per_1k_requests_usd=round(cost_per_1k_requests(hourly_price, per_request_ms / 1000), 6))


def champion_evidence(model_name: str, test_sha: str, needed: set[str], examples: list[dict], schema: AnswerSchema,
                      eval_cfg, base_path: str, io: StageIO, per_chat: bool = False
                      ) -> tuple[dict | None, dict[str, str] | None, str]:
    """The current champion's metrics on this test split, its answer to each test chat
    (ticket id -> answer; when ``per_chat``, else None) and where they come from: the
    version itself (same test SHA-256, every needed metric recorded in its tags, its
    ``predictions.jsonl``) or a new evaluation of its adapter here.
    (None, None, "no champion") when there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model, or no alias
            return None, None, "no champion"
        raise StageError(f"cannot read the champion of {model_name!r} from the model registry at "
                         f"{mlflow.get_tracking_uri()}: {str(exc).splitlines()[0]}") from exc
    tags = version.tags
    recorded = {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}
    answers = _recorded_answers(version) if per_chat and tags.get("data_sha256.test") == test_sha else None
    if tags.get("data_sha256.test") == test_sha and needed <= recorded.keys() and (answers or not per_chat):
        return recorded, answers, f"champion v{version.version}"
    why = ("another test split" if tags.get("data_sha256.test") != test_sha else
           "metrics not recorded" if not needed <= recorded.keys() else "per-chat answers not recorded")
    metrics, answers = _reevaluate(version, examples, schema, eval_cfg, base_path, io)
    return metrics, answers if per_chat else None, f"champion v{version.version} (re-evaluated: {why})"


def _recorded_answers(version) -> dict[str, str] | None:
    """The answers to the test chats a version holds (its ``predictions.jsonl``); None when
    it holds none (registered before versions kept them)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"{version.source}/{PREDICTIONS}", dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return read_answers(Path(path))


def _reevaluate(version, examples: list[dict], schema: AnswerSchema, eval_cfg, base_path: str,
                io: StageIO) -> tuple[dict, dict[str, str]]:
    """Evaluate a registered version's adapter on ``examples``: its metrics and its answer to
    each chat by ticket id (cached by adapter, base weights, test chats and settings)."""
    import mlflow

    base_sha = weights_sha256(base_path, io.state_dir)
    if version.tags.get("base_model_sha256") not in (None, base_sha):
        raise StageError(f"champion v{version.version} was trained on other base weights "
                         f"({version.tags['base_model_sha256'][:12]}) than finetune.base_model ({base_sha[:12]}); "
                         "it cannot be evaluated again here")
    key = json.dumps({"adapter": version.tags.get("adapter_sha256", f"{version.name}/{version.version}"),
                      "base": base_sha, "test": hashlib.sha256(json.dumps(examples).encode()).hexdigest(),
                      "settings": [eval_cfg.batch_size, eval_cfg.max_new_tokens,
                                   getattr(eval_cfg, "perplexity_examples", None)], "schema": schema.schema,
                      "version": CACHE_VERSION}, sort_keys=True)
    cache = io.state_dir / "cache" / "evaluate" / f"champion-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        return cached["metrics"], cached["answers"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{version.name}/{version.version}", dst_path=tmp))
        tokenizer, model = load(base_path, adapter=folder / "adapter")
        done = measure(model, tokenizer, examples, schema, eval_cfg.batch_size, eval_cfg.max_new_tokens,
                       label=f"champion v{version.version}",
                       perplexity_examples=getattr(eval_cfg, "perplexity_examples", None))
    metrics, answers = done.metrics.flat(), {str(e.get("ticket_id")): a for e, a in zip(examples, done.answers)}
    write_json(cache, {"metrics": metrics, "answers": answers})
    return metrics, answers


def pair_up(schema: AnswerSchema, examples: list[dict], champion: dict[str, str], candidate: dict[str, str],
            metrics: set[str]) -> dict[str, Paired]:
    """Each rate in ``metrics`` of the candidate against the champion on the test chats both
    answered (in the test split's order)."""
    ours, theirs = outcomes_by_chat(schema, examples, candidate), outcomes_by_chat(schema, examples, champion)
    out = {}
    for metric in metrics:
        if metric not in ours:
            raise StageError(f"vs_champion gate: {metric!r} is not a rate of this task's answers "
                             f"(rates: {', '.join(ours)})")
        both = [t for t in ours[metric] if t in theirs[metric]]
        if not both:
            raise StageError("vs_champion gate: the champion and the candidate answered no test chat in common")
        out[metric] = paired([theirs[metric][t] for t in both], [ours[metric][t] for t in both])
    return out


def run_probes(checks: dict, examples: list[dict], ctx: ProbeContext, answer) -> dict[str, dict]:
    """Build every probed gate's probes, answer them in one batch with ``answer(list of
    chats) -> list of answers``, and score each gate's probes."""
    built = {name: gate.probes(examples, ctx) for name, gate in checks.items() if isinstance(gate, PROBED)}
    chats: dict[str, dict] = {}
    for cases in built.values():
        for case in cases:
            for chat in case:
                if isinstance(chat, dict):
                    chats.setdefault(json.dumps(chat["messages"], sort_keys=True), chat)
    keys = list(chats)
    answers = dict(zip(keys, answer([chats[k] for k in keys]))) if keys else {}

    def said(chat: dict) -> str:
        return answers[json.dumps(chat["messages"], sort_keys=True)]

    results = {}
    for name, cases in built.items():
        verdicts = [checks[name].passed(case, said, ctx) for case in cases]
        results[name] = {"passed": sum(ok for ok, _ in verdicts), "n": len(verdicts),
                         "failures": [detail for ok, detail in verdicts if not ok][:5]}
    return results


# ---------------------------------------------------------------- the stage

def run(cfg: GatesSpec, io: StageIO) -> StageResult:
    """Check every gate of ``cfg.checks``; the report is the stage's metrics.json."""
    task: TaskSpec = io.sections["task"]
    eval_cfg = io.sections.get("evaluate", cfg)
    model_name = io.sections["register"].model_name
    evaluation = EvaluationReport.read(io.inputs["evaluate"])
    test_path = io.inputs["prepare"] / "test.jsonl"
    test_sha = file_sha256(test_path)
    if evaluation.test_sha256 != test_sha:
        raise StageError("evaluate's metrics are for a different test split than prepare's "
                         f"({evaluation.test_sha256[:12]} vs {test_sha[:12]}); run the evaluate stage again")
    schema = AnswerSchema.read(io.inputs["prepare"] / AnswerSchema.FILE)
    base_path = base_model_path(io)
    adapter = io.inputs["finetune"] / "adapter"
    examples = read_examples(test_path)
    gates = cfg.checks.values()

    ev = Evidence(candidate=evaluation.candidate, base=evaluation.base)
    ev.slices = evaluation.slices.get("candidate", {})
    if any(g.kind == "budget" for g in gates):
        compressed = CompressReport.read(io.inputs["compress"]) if "compress" in io.inputs else None
        ev.operational = operational(evaluation.candidate, compressed, [Path(base_path), adapter],
                                     cfg.hourly_price_usd)
    if any(g.kind == "vs_champion" for g in gates):
        needed = {g.metric for g in gates if g.kind == "vs_champion"}
        rates = {m for m in needed if is_rate(m)}
        evaluated = examples[:getattr(eval_cfg, "max_examples", None)]
        ev.champion, answers, ev.champion_note = champion_evidence(model_name, test_sha, needed, evaluated, schema,
                                                                   eval_cfg, base_path, io, per_chat=bool(rates))
        if answers is not None:
            ev.paired = pair_up(schema, evaluated, answers, read_answers(io.inputs["evaluate"] / PREDICTIONS), rates)
    if any(isinstance(g, PROBED) for g in gates):
        try:
            tokenizer, model = load(base_path, adapter=adapter)
        except ModelError as exc:
            raise StageError(str(exc)) from exc

        def answer(chats: list[dict]) -> list[str]:
            prompts = [prompt_ids(c["messages"][:-1], tokenizer) for c in chats]
            return generate(model, tokenizer, prompts, cfg.batch_size, cfg.max_new_tokens,
                            stop_when=cannot_be_answer).texts

        ctx = ProbeContext(template=task.user_template, system_prompt=task.system_prompt, schema=schema,
                           build=lambda request, articles: build_messages(request, task, articles))
        ev.probes = run_probes(cfg.checks, examples[:cfg.probe_examples], ctx, answer)
        del model

    report = check_all(cfg.checks, ev, test_sha, model_name)
    summary = markdown_report(report)
    (io.out_dir / "report.md").write_text(summary + "\n", encoding="utf-8")
    tracking.set_tags({"gates.status": report.status, "gates.failed": ",".join(report.failed),
                       **{f"gate.{r.gate}": "passed" if r.passed else "failed" for r in report.gates}})
    tracking.log_artifacts(io.out_dir / "report.md", "gates")
    return StageResult(outputs={"report": io.out_dir / "report.md"}, report=report, summary=summary)


def markdown_report(report: GateReport) -> str:
    head = (f"### gates: {report.status}\n"
            + (f"Failed: {', '.join(report.failed)}.\n" if report.failed else "Every gate passed.\n")
            + f"Compared with: {report.champion}.")
    op = report.operational
    if op is not None:
        per_request = (f"{op.latency_p50_ms:g} ms per request (p50 of {op.latency_requests}, batch 1)"
                       if op.latency_p50_ms is not None else
                       f"{op.latency_max_ms:g} ms per request (max of {op.latency_requests}, batch 1)")
        head += (f" Served variant: {op.source}; cost per 1,000 requests ${op.cost_per_1k_requests_usd:.4f} "
                 f"at ${op.hourly_price_usd:g}/h and {per_request}.")
    return head + "\n\n" + markdown_table(report.rows())


__all__ = ["GatesSpec", "Evidence", "check_all", "run", "operational", "cost_per_1k_requests"]
