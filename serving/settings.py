"""The ``serve`` section of a pipeline in pipelines.yaml, and where API keys come from."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import Field, field_validator

from components.base import StrictModel, variable_name


class BatchingSpec(StrictModel):
    max_batch_size: int = Field(8, ge=1, le=256)  # requests generated together
    max_wait_ms: float = Field(10.0, ge=0)  # how long a request waits for others to join its batch
    max_queue: int = Field(64, ge=1)  # requests waiting beyond this are refused (429, Retry-After)
    retry_after_s: int = Field(1, ge=1)  # the Retry-After of a refusal


class LimitsSpec(StrictModel):
    max_body_bytes: int = Field(65_536, ge=1024)  # larger request bodies: 413
    max_prompt_tokens: int = Field(1024, ge=1)  # longer prompts: 400
    max_tokens: int = Field(256, ge=1)  # the most a request may ask to generate: 400 beyond
    default_max_tokens: int = Field(64, ge=1)  # when a request names none (a triage answer is ~30)
    request_timeout_s: float = Field(60.0, gt=0)  # no answer by then: 504; the engine drops the request


class RateLimitSpec(StrictModel):
    # Per API key (per client address without keys), in a moving one-minute window: 429
    # with Retry-After beyond. null: no limit.
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)  # prompt + generated tokens (cache hits cost none)


class CacheSpec(StrictModel):
    max_entries: int = Field(1024, ge=0)  # greedy answers kept (least recently used go first); 0: no cache
    ttl_s: float = Field(3600.0, gt=0)  # an answer older than this is generated again


class RequestLogSpec(StrictModel):
    enabled: bool = True  # every request and answer as a JSON line (what monitoring reads)
    folder: str | None = None  # null: <state_dir>/serving/requests/<model name>
    max_file_mib: float = Field(64.0, gt=0)  # a new file each UTC hour, or sooner past this size
    max_queue: int = Field(10_000, ge=1)  # records waiting for the writer; beyond: dropped and counted
    redact_pii: bool = False  # replace e-mail addresses, card and phone numbers as validation does
    s3_uri: str | None = Field(None, pattern=r"^s3://[^/]+")  # also ship the files to s3://bucket/prefix/<model name>/ (null: local only)
    upload_every_s: float = Field(60.0, gt=0)  # how often the growing file is shipped again


class UpstreamSpec(StrictModel):
    """An external OpenAI-compatible engine (vLLM, a KServe Hugging Face runtime) that
    generates instead of this process; keys, limits, the cache, features, retrieval and the
    request log stay here."""
    url: str | None = None  # its OpenAI base URL (vLLM: http://host:8000/v1); null: the in-process engine
    model: str | None = None  # the model name it serves; null: the version's name/version
    api_key_env: str | None = None  # environment variable with its API key (sent as a Bearer token)
    connect_timeout_s: float = Field(5.0, gt=0)  # no connection by then: 503
    read_timeout_s: float = Field(60.0, gt=0)  # no bytes of an answer for this long: 504
    max_concurrent: int = Field(16, ge=1)  # requests in flight to it; more wait (batching.max_queue)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, e.g. http://vllm:8000/v1 (got {url!r})")
        return url.rstrip("/")

    _key = field_validator("api_key_env")(classmethod(lambda cls, v: variable_name(v, "the key itself")))


class ServeSpec(StrictModel):
    host: str = "127.0.0.1"  # 0.0.0.0 exposes it to the network: set keys first
    port: int = Field(8000, ge=1, le=65535)
    model: str | None = None  # name@alias or name/version; null: <register.model_name>@champion
    # API keys: "id:key" entries (comma or newline separated) in this environment variable,
    # or one per line in api_keys_file (kept out of git). None set: no key is needed.
    api_keys_env: str = "LLMOPS_API_KEYS"
    api_keys_file: str | None = None
    # The admin routes (/admin/*: rollouts, serving/rollout.py) need this variable's key;
    # unset: they answer calls from this machine only.
    admin_key_env: str = "LLMOPS_ADMIN_KEY"
    triage: bool = True  # POST /v1/triage (needs the feature server: `llmops serve` starts one if none runs)
    constrain_answers: bool = True  # triage decodes only answers the task's schema allows
    batching: BatchingSpec = BatchingSpec()
    limits: LimitsSpec = LimitsSpec()
    rate_limits: RateLimitSpec = RateLimitSpec()
    cache: CacheSpec = CacheSpec()
    request_log: RequestLogSpec = RequestLogSpec()
    upstream: UpstreamSpec = UpstreamSpec()

    _keys = field_validator("admin_key_env", "api_keys_env")(
        classmethod(lambda cls, v: variable_name(v, "the key itself")))


def parse_keys(text: str, where: str) -> dict[str, str]:
    """key id -> secret from ``id:key`` entries; a bare key gets an id from its hash (so logs
    can name the caller without holding the key). ValueError names a bad entry."""
    keys: dict[str, str] = {}
    for n, entry in enumerate(e.strip() for e in text.replace("\n", ",").split(",")):
        if not entry or entry.startswith("#"):
            continue
        key_id, secret = entry.split(":", 1) if ":" in entry else ("", entry)
        key_id = key_id.strip() or f"key-{hashlib.sha256(secret.encode()).hexdigest()[:8]}"
        if len(secret.strip()) < 16:
            raise ValueError(f"{where}: entry {n + 1} ({key_id}): a key must have at least 16 characters")
        keys[key_id] = secret.strip()
    return keys


def load_keys(spec: ServeSpec, root: Path) -> dict[str, str]:
    """The configured API keys (empty: none needed), from the environment and the key file."""
    keys = parse_keys(os.environ.get(spec.api_keys_env, ""), f"${spec.api_keys_env}")
    if spec.api_keys_file:
        path = Path(spec.api_keys_file)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise ValueError(f"serve.api_keys_file: {path} does not exist")
        keys |= parse_keys(path.read_text(encoding="utf-8"), str(path))
    return keys
