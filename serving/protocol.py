"""The wire format: the fields of OpenAI's chat completion and (legacy) completion requests
this endpoint honours, OpenAI's error shape, ``{"error": {"message", "type", "param",
"code"}}``, and the checks of a ``response_format`` (its schema, and whether an answer
meets it)."""
from __future__ import annotations

import json

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from components.task import AnswerSchema


class ApiError(Exception):
    """A refusal: its HTTP status, a message naming what is wrong, and OpenAI's error fields."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None  # OpenAI's {"name", "schema", "strict"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class Sampled(BaseModel):
    """The fields both requests share; others (seed, user, ...) are accepted and ignored."""
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)  # 0 (the default here): greedy, deterministic
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampled):
    """The fields of OpenAI's chat completion request this endpoint honours (logprobs=false
    and other fields are accepted and ignored)."""
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampled):
    """The fields of OpenAI's legacy completion request this endpoint honours: one text
    prompt (tokenized as it is, with the tokenizer's own special tokens, as vLLM does)."""
    prompt: str = Field(min_length=1)
    echo: Literal[False] = False  # the prompt is not repeated in the answer
    logprobs: None = None  # not offered
    suffix: None = None  # no insertion


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def check_schema(fmt: ResponseFormat) -> None:
    """ApiError 400 when the request's json_schema is not a JSON Schema."""
    schema = (fmt.json_schema or {}).get("schema")
    if schema is None:
        return
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ApiError(400, f"response_format.json_schema.schema is not a valid JSON Schema: {exc.message}",
                       param="response_format.json_schema.schema", code="invalid_schema") from None


def json_check(text: str, fmt: ResponseFormat, task_schema: AnswerSchema) -> dict:
    """For response_format json_object/json_schema: is the answer one JSON object (matching
    the given schema, or the task's answer schema when the request names none)? The answer
    is returned either way; ``valid`` and ``errors`` say what is wrong with it."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return {"valid": False, "errors": [f"not JSON: {exc.msg} at character {exc.pos}"]}
    if not isinstance(value, dict):
        return {"valid": False, "errors": ["not a JSON object"]}
    if fmt.type == "json_object":
        return {"valid": True, "errors": []}
    schema = (fmt.json_schema or {}).get("schema")
    if schema is None:
        errors = task_schema.errors(text)
    else:
        from jsonschema import Draft202012Validator

        errors = [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"
                  for e in Draft202012Validator(schema).iter_errors(value)]
    return {"valid": not errors, "errors": errors}
