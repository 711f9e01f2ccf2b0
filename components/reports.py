"""What each stage reports to the stages and commands after it: typed, with units in the
field names (``size_mib`` is 2^20 bytes everywhere, ``tokens_per_s_batched`` is at the
``batch_size`` the report states). A stage's report is its ``metrics.json`` (DVC metrics;
its numbers are MLflow metrics too); a later stage reads it back with ``XReport.read(folder)``,
so a renamed or missing field is an error at the reader, not a silent None.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from components.base import Report
from components.stats import Latency, wilson


class IngestOrigin(Report):
    """One ``ingest.extra`` folder: what it added and which version of it."""
    uri: str
    rows: dict[str, int]  # table -> rows added
    sha256: dict[str, str]  # table -> its file's SHA-256
    dvc_md5: str | None = None  # the folder's hash in the .dvc file beside it (DVC-versioned data)
    models: dict[str, int] = {}  # labelled traffic: rows per model version that answered (origin.parquet)


class IngestReport(Report):
    source: str
    rows: dict[str, int]  # table -> rows
    tickets_sha256: str
    tickets_by_origin: dict[str, int] = {}  # "source" or an ingest.extra entry -> tickets
    extra: list[IngestOrigin] = []


class NearDuplicatePair(Report):
    """An evaluation ticket and its most similar training ticket (texts shortened)."""
    ticket_id: str
    split: str  # validation or test
    train_ticket_id: str
    similarity: float  # Jaccard of the two shingle sets, 0..1
    text: str
    train_text: str


class NearDuplicateReport(Report):
    """Validation and test tickets with a near copy in the training split."""
    checked: int  # validation + test tickets compared with the training split
    pairs: int  # of those, how many have a training ticket at or above the similarity
    share: float  # pairs / checked
    by_split: dict[str, int]  # validation / test -> pairs
    similarity: float  # the threshold (Jaccard)
    shingle: str  # e.g. "words 3-grams"
    max_share: float
    action: Literal["warn", "error", "quarantine"]
    success: bool  # share <= max_share
    quarantined: int  # rows set aside for it (action quarantine)
    examples: list[NearDuplicatePair] = []


class ValidationReport(Report):
    success: bool
    rows_in: int
    rows_out: int
    quarantined: int
    pii_redacted: int
    failed_errors: int
    failed_warnings: int
    expectations: int
    near_duplicates: NearDuplicateReport | None = None  # None: the check did not run


class FeaturesReport(Report):
    n_profiles: int
    n_customers: int
    n_articles: int
    articles_embedded: int
    articles_reused: int


class SplitInfo(Report):
    examples: int
    sha256: str


class PrepareReport(Report):
    splits: dict[str, SplitInfo]
    n_without_features: int  # requests whose entity had no features as of their time
    retrieval_top_k: int | None = None  # None: the prompt shows no retrieved articles
    retrieval_recall: dict[str, float] = {}  # split (and "all") -> share of gold articles among the top k


class TrainingReport(Report):
    steps: int
    max_steps: int
    stopped_by: Literal["max_steps", "early_stopping"]
    resumed_from_step: int | None
    train_loss_last: float | None
    best_val_loss: float | None
    tokens_per_s: float
    minutes: float
    trainable_params: int
    total_params: int
    trainable_share: float
    examples: int
    skipped_too_long: int
    device: str
    dtype: str
    peak_memory_mib: float | None = None  # GPU only


class ModelMetrics(Report):
    """One model's task metrics on a set of chats. Each rate has its 95% Wilson interval
    (``<rate>_ci``: [lo, hi]); latency percentiles are claimed only when ``latency_requests``
    supports them (components/stats.py: p50 needs 2 requests, p95 20), the slowest is
    always there."""

    n: int
    json_valid_rate: float
    exact_match: float
    field_accuracy: dict[str, float]  # answer field -> share right
    json_valid_rate_ci: list[float] | None = None  # 95% Wilson interval [lo, hi]
    exact_match_ci: list[float] | None = None
    field_accuracy_ci: dict[str, list[float]] = {}  # answer field -> 95% Wilson interval
    perplexity: float | None = None  # of the gold answers
    latency_requests: int = 0  # requests timed one at a time, which the latency figures come from
    latency_p50_ms: float | None = None  # None: fewer than 2 requests
    latency_p95_ms: float | None = None  # None: fewer than 20 requests (see latency_max_ms)
    latency_max_ms: float | None = None  # the slowest of latency_requests
    generated_tokens_per_s: float | None = None  # batched generation
    batch_size: int | None = None  # of that batched generation
    generation_seconds: float | None = None

    @classmethod
    def from_outcomes(cls, outcomes: dict[str, list[bool]], **more: Any) -> "ModelMetrics":
        """From :meth:`components.task.AnswerSchema.outcomes` (per-chat right or not by metric
        name): each rate and its interval."""
        n = len(outcomes["exact_match"])
        rate = {k: round(sum(v) / n, 4) if n else 0.0 for k, v in outcomes.items()}
        ci = {k: wilson(sum(v), n) for k, v in outcomes.items()}
        fields = [k.removesuffix("_accuracy") for k in outcomes if k.endswith("_accuracy")]
        return cls(n=n, json_valid_rate=rate["json_valid_rate"], exact_match=rate["exact_match"],
                   field_accuracy={f: rate[f"{f}_accuracy"] for f in fields},
                   json_valid_rate_ci=ci["json_valid_rate"], exact_match_ci=ci["exact_match"],
                   field_accuracy_ci={f: ci[f"{f}_accuracy"] for f in fields}, **more)

    def flat(self) -> dict[str, float]:
        """Every metric by the name gates and tags use (``intent_accuracy``, ``exact_match``...)."""
        out = {k: v for k, v in self.model_dump().items() if isinstance(v, (int, float)) and v is not None}
        out.update({f"{k}_accuracy": v for k, v in self.field_accuracy.items()})
        return out

    def interval(self, metric: str) -> list[float] | None:
        """The 95% interval of a rate by its flat name (``exact_match``, ``intent_accuracy``)."""
        if metric.endswith("_accuracy"):
            return self.field_accuracy_ci.get(metric.removesuffix("_accuracy"))
        return {"exact_match": self.exact_match_ci, "json_valid_rate": self.json_valid_rate_ci}.get(metric)

    def latency(self) -> Latency:
        return Latency(self.latency_requests, self.latency_p50_ms, self.latency_p95_ms, self.latency_max_ms)


class EvaluationReport(Report):
    candidate: ModelMetrics
    base: ModelMetrics
    base_cached: bool
    exact_match_gain: float
    # model -> field -> value -> {n, exact_match, exact_match_ci: 95% Wilson [lo, hi]}
    slices: dict[str, dict[str, dict[str, dict[str, float | list[float] | None]]]]
    base_model_sha256: str
    test_sha256: str


class VariantReport(Report):
    """One compressed variant, measured like every other on the same validation chats."""

    parent: str | None
    format: Literal["safetensors", "onnx"]
    build_s: float
    details: dict[str, Any] = {}
    size_mib: float
    load_s: float
    forward_p50_ms: float
    tokens_per_s_batch1: float  # generated tokens/s, one request at a time
    tokens_per_s_batched: float  # generated tokens/s at the report's batch_size
    latency_requests: int = 0  # requests timed one at a time, which the request latencies come from
    request_latency_p50_ms: float | None  # batch 1; None: fewer than 2 requests
    request_latency_p95_ms: float | None  # None: fewer than 20 requests (see request_latency_max_ms)
    request_latency_max_ms: float | None = None  # the slowest of latency_requests
    quality: ModelMetrics
    jaccard_at: dict[int, float] = {}  # k -> top-k next-token agreement with the reference
    jaccard_at_1_vs_parent: float | None = None
    vs_reference: dict[str, float] = {}
    vs_parent: dict[str, float] = {}
    budget_broken: list[str] = []

    def latency(self) -> Latency:
        return Latency(self.latency_requests, self.request_latency_p50_ms, self.request_latency_p95_ms,
                       self.request_latency_max_ms)

    @property
    def within_budget(self) -> bool:
        return not self.budget_broken


class CompressReport(Report):
    chosen: str
    reason: str
    reference: str
    objective: str
    budget: dict[str, float | None]
    validation_examples: int
    batch_size: int  # of tokens_per_s_batched
    cpu: str  # the CPU's instruction sets that matter to the quantized kernels
    variants: dict[str, VariantReport]

    @property
    def served(self) -> VariantReport:
        return self.variants[self.chosen]


class PairedTest(BaseModel):
    """Candidate against champion on the same chats (components/stats.py ``paired``)."""
    n: int  # chats both answered
    b: int  # champion right, candidate wrong
    c: int  # candidate right, champion wrong
    difference: float  # candidate - champion = (c - b) / n
    difference_ci: list[float]  # 95% Agresti-Min interval of the difference
    p_value: float  # one-sided exact McNemar: of a drop (max_regression) or of a gain (min_gain)
    alpha: float  # the gate's significance level
    significant: bool  # p_value < alpha


class GateRow(Report):
    gate: str
    kind: str
    metric: str
    observed: float | None
    op: str
    threshold: float | None
    margin: float | None
    passed: bool
    note: str = ""
    failures: list[str] = []
    paired: PairedTest | None = None  # vs_champion on a rate: the paired test that decided it


class Operational(Report):
    """The served variant's numbers the budget gates check."""

    source: str
    latency_requests: int  # requests timed one at a time
    latency_p50_ms: float | None  # None: fewer than 2 requests
    latency_p95_ms: float | None  # None: fewer than 20 requests; the latency budget then checks the max
    latency_max_ms: float | None
    tokens_per_s: float
    size_mib: float
    hourly_price_usd: float
    cost_per_1k_requests_usd: float


class GateReport(Report):
    status: Literal["passed", "failed"]
    failed: list[str]
    gates: list[GateRow]
    champion: str  # what the vs_champion gates compared with
    operational: Operational | None = None
    test_sha256: str
    model_name: str

    def rows(self) -> list[dict[str, str]]:
        """The gates as table rows (strings), for Markdown and the terminal."""
        def num(v):
            return "" if v is None else f"{v:g}"
        return [{"gate": r.gate, "kind": r.kind, "metric": r.metric, "observed": num(r.observed),
                 "threshold": f"{r.op} {num(r.threshold)}".strip(), "margin": num(r.margin),
                 "result": "pass" if r.passed else "FAIL", "note": r.note} for r in self.gates]

    def failing(self) -> list[str]:
        """'name (metric observed op threshold, margin m)' for each failed gate."""
        return [f"{r.gate} ({r.metric} {r.observed:g} {r.op} {r.threshold:g}, margin {r.margin:g})"
                for r in self.gates if not r.passed]


class RegistrationReport(Report):
    model_name: str
    version: int
    alias: str
    run_id: str
    tracking_uri: str
    model_uri: str
    gates_status: str | None = None
    gates_sha256: str | None = None  # digest of the gate report the version holds
    serving_variant: str | None = None


class PromotionReport(Report):
    model_name: str
    version: int
    outcome: Literal["promoted", "already champion", "refused"]
    mode: str
    champion_before: int | None
    failed_gates: list[str]
    moves: list[dict[str, Any]] = Field(default_factory=list)


class DeployCheck(BaseModel):
    """One check of a deploy: what was observed against what was required."""
    name: str
    observed: float | None
    threshold: float | None
    op: str  # ">=" or "<="
    passed: bool
    detail: str = ""

    def line(self) -> str:
        seen = "n/a" if self.observed is None else f"{self.observed:g}"
        return (f"{self.name}: {seen} {self.op} {self.threshold:g}" if self.threshold is not None else
                f"{self.name}: {seen}") + f" -> {'ok' if self.passed else 'FAILED'}" + \
            (f" ({self.detail})" if self.detail else "")


class DeployReport(Report):
    """What the deploy stage did: the version, where, how, and every check with its numbers."""
    model_name: str
    version: int
    target: str
    strategy: str
    outcome: Literal["deployed", "already live", "refused", "rolled back", "written", "failed"]
    reason: str | None = None
    previous: int | None = None  # the version live there before
    url: str | None = None
    started_endpoint: bool = False
    checks: list[DeployCheck] = Field(default_factory=list)
    numbers: dict[str, Any] = Field(default_factory=dict)  # smoke, shadow or canary figures
    moves: list[dict[str, Any]] = Field(default_factory=list)
    seconds: float = 0.0
