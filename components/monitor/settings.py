"""The ``monitor`` section of a pipeline in pipelines.yaml: which requests, which signals
with which thresholds, and where alerts go. Secrets (webhook URLs, SMTP passwords) are
named by environment variable, never written here."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from components.base import StrictModel


class Signal(StrictModel):
    """One drift signal: its threshold (the direction is the signal's own, see SIGNALS) and
    the fewest requests it is judged on; below that it reports "not enough data"."""
    enabled: bool = True
    threshold: float
    min_window: int = Field(50, ge=1)


class EmbeddingSignal(Signal):
    # model: a classifier told reference from window (ROC AUC; Evidently's default method);
    # distance (Euclidean distance of the means), ratio (share of drifted components), mmd.
    method: Literal["model", "distance", "ratio", "mmd"] = "model"
    threshold: float = 0.58  # measured: unshifted windows of 300 reached 0.578 (bench/drift_power.py)
    min_window: int = Field(100, ge=10)
    max_rows: int = Field(1000, ge=50)  # window and reference rows embedded (a random sample beyond)
    pca_components: int | None = Field(None, ge=2)
    # bfloat16 arithmetic where the CPU has it (AVX512-BF16/AMX): ~2x faster, embeddings within
    # 1e-4 cosine of float32, but not bit-identical, so a CPU without it could judge differently.
    bf16: bool = False


def _signal(threshold: float, min_window: int = 50) -> Signal:
    return Signal(threshold=threshold, min_window=min_window)


class Signals(StrictModel):
    # Distribution signals (prompt_tokens, frequent_words, embeddings, answer_labels) drift
    # only beyond their threshold AND beyond what windows of the same size drawn from the
    # reference itself reach with this probability: small windows do not raise false alarms.
    chance_quantile: float = Field(0.99, gt=0.5, lt=1)
    # tokens: prompt length (served tokenizer) as Wasserstein distance in reference std units
    prompt_tokens: Signal = _signal(0.15)
    unseen_words: Signal = _signal(0.03)  # share of the window's words the reference never had
    frequent_words: Signal = _signal(0.1)  # Jensen-Shannon distance of word frequencies
    embeddings: EmbeddingSignal = EmbeddingSignal()
    # Jensen-Shannon distance of predicted vs training labels (worst field). At 100 requests it
    # false-alarmed in 5/100 unshifted windows (bench/drift_power.py), at 300 in 0/100.
    answer_labels: Signal = _signal(0.1, 300)
    answer_validity: Signal = _signal(0.95, 20)  # share of answers the schema accepts; drift below
    retrieval_similarity: Signal = _signal(0.5, 20)  # median similarity of the top article; drift below
    error_rate: Signal = _signal(0.05, 20)  # share of 5xx answers
    p95_latency_ms: Signal = _signal(30_000.0, 20)
    rate_limited_share: Signal = _signal(0.1, 20)  # share of 429 answers


class Window(StrictModel):
    last_requests: int | None = Field(1000, ge=1)  # the newest N records of the served version
    hours: float | None = Field(None, gt=0)  # or: records of the last H hours (both: whichever is fewer)


class FileChannel(StrictModel):
    kind: Literal["file"]
    path: str | None = None  # JSON lines; null: <state_dir>/monitor/<pipeline>/alerts.jsonl


class WebhookChannel(StrictModel):
    kind: Literal["webhook", "slack"]  # webhook: the alert as JSON; slack: incoming-webhook text
    url_env: str  # the environment variable holding the URL (never the URL itself)


class EmailChannel(StrictModel):
    kind: Literal["email"]
    host_env: str = "LLMOPS_SMTP_HOST"  # host[:port] of the SMTP server
    sender: str = "llmops@localhost"
    to_env: str = "LLMOPS_ALERT_EMAIL_TO"  # comma-separated addresses
    username_env: str | None = "LLMOPS_SMTP_USER"  # unset or empty: no login
    password_env: str | None = "LLMOPS_SMTP_PASSWORD"
    starttls: bool = False


Channel = Annotated[Union[FileChannel, WebhookChannel, EmailChannel], Field(discriminator="kind")]


class AlertSpec(StrictModel):
    channels: list[Channel] = [FileChannel(kind="file")]
    cooldown_minutes: float = Field(360.0, ge=0)  # a signal still drifting alerts again only after this
    retries: int = Field(3, ge=0)  # a failing channel is tried again this many times
    backoff_s: float = Field(1.0, ge=0)  # doubling wait between those tries
    timeout_s: float = Field(10.0, gt=0)


class MonitorSpec(StrictModel):
    # Where the request log is: null: serve.request_log (its folder); a folder; or s3://bucket/prefix
    log: str | None = None
    routes: list[str] = ["/v1/triage", "/v1/chat/completions", "/v1/completions"]
    window: Window = Window()
    reference_split: Literal["train", "validation", "test"] = "train"
    signals: Signals = Signals()
    alerts: AlertSpec = AlertSpec()
    seed: int = 0

    @model_validator(mode="after")
    def _window(self) -> "MonitorSpec":
        if self.window.last_requests is None and self.window.hours is None:
            raise ValueError("window: set last_requests, hours or both")
        return self
