"""The task the model learns, as ``pipelines.yaml`` declares it (``task:``): the prompt (a
system prompt and a user template), and the answer: a JSON object whose fields and allowed
values are listed, or read from a table (e.g. article ids from the articles table).

Everything that builds prompts, writes gold answers, parses or scores model answers uses
this module: prepare (training chats), evaluate, compress and gates (scoring), and the
endpoint (the same prompt builder, answers checked against the same JSON Schema). The
schema is derived from the spec with the table-bound values filled in from the data
(:func:`answer_schema`); `llmops task schema` prints it.
"""
from __future__ import annotations

import json
import string
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from components.base import StageError, StrictModel, write_json
from components.stats import wilson

ARTICLES = "articles"  # the placeholder the retrieved articles are rendered into
INVALID = "(invalid)"  # the predicted class of an answer that is not valid
UNKNOWN = "unknown"  # a prompt value that is missing (e.g. a customer without a profile)

# The demo's prompt (as pipelines.yaml ships it).
DEFAULT_SYSTEM = ('Triage the Tessera support ticket. Reply only with JSON: '
                  '{"intent": ..., "priority": ..., "article_id": ...}.')
DEFAULT_TEMPLATE = ("Channel: {channel} | plan: {plan} | account weight: {account_weight}\nSubject: {subject}\n\n"
                    "{body}\n\nArticles:\n{articles}")


class AnswerField(StrictModel):
    """One field of the answer: a string from a list, or from a table's column."""

    values: list[str] | None = Field(None, min_length=1)  # allowed values (ordered fields: lowest first)
    values_from: str | None = Field(None, pattern=r"^[A-Za-z_]\w*\.[A-Za-z_]\w*$")  # "table.column"
    ordered: bool = False  # the values are ranked, lowest first (directional gates compare ranks)

    @model_validator(mode="after")
    def _one_source(self) -> "AnswerField":
        if (self.values is None) == (self.values_from is None):
            raise ValueError("give exactly one of values (a list) and values_from (table.column)")
        if self.ordered and self.values is None:
            raise ValueError("ordered needs values (the ranking, lowest first)")
        return self


def template_fields(template: str) -> list[str]:
    """The placeholders of a prompt template, in order of first use."""
    names: list[str] = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in names:
            names.append(name)
    return names


DEFAULT_ANSWER = {
    "intent": AnswerField(values=["billing_refund", "login_problem", "bug_report", "performance", "feature_request",
                                  "integration_setup", "data_export", "account_cancellation"]),
    "priority": AnswerField(values=["low", "medium", "high", "urgent"], ordered=True),
    "article_id": AnswerField(values_from="articles.article_id"),
}


class TaskSpec(StrictModel):
    system_prompt: str = Field(DEFAULT_SYSTEM, min_length=1)  # the instruction sent with every request
    user_template: str = Field(DEFAULT_TEMPLATE, min_length=1)  # the request: {placeholders} from the data
    answer: dict[str, AnswerField] = Field(default_factory=lambda: dict(DEFAULT_ANSWER), min_length=1)
    retrieval_query: list[str] = Field(["subject", "body"], min_length=1)  # fields the article search reads

    @field_validator("user_template")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        try:
            names = template_fields(value)
        except ValueError as exc:
            raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
        bad = [n for n in names if not n.isidentifier()]
        if bad:
            raise ValueError(f"placeholders must be plain names, got {', '.join('{' + b + '}' for b in bad)}")
        return value

    @field_validator("answer")
    @classmethod
    def _field_names(cls, answer: dict) -> dict:
        bad = [n for n in answer if not n.isidentifier()]
        if bad:
            raise ValueError(f"answer field names must be plain names, got {', '.join(map(repr, bad))}")
        return answer

    def uses_retrieval(self) -> bool:
        return ARTICLES in template_fields(self.user_template)

    def tables(self) -> set[str]:
        """Tables the answer's values come from."""
        return {f.values_from.split(".")[0] for f in self.answer.values() if f.values_from}


# ---------------------------------------------------------------- prompts and gold answers

def render_articles(articles: list[dict]) -> str:
    return "\n".join(f"- {a['article_id']}: {a['title']}" for a in articles) or "- (none found)"


def _shown(value: Any) -> Any:
    if value is None or value != value:  # None or NaN
        return UNKNOWN
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def build_messages(row: dict, task: TaskSpec, articles: list[dict] | None = None) -> list[dict[str, str]]:
    """The system and user messages for one request: ``row``'s fields (the ticket, the
    customer's features) and the retrieved articles through the task's template. Training,
    evaluation, the gates' probes and the endpoint all build prompts here. Raises
    StageError naming a placeholder the row does not have."""
    fields = {}
    for name in template_fields(task.user_template):
        if name == ARTICLES:
            fields[name] = render_articles(articles or [])
        elif name in row:
            fields[name] = _shown(row[name])
        else:
            raise StageError(f"task.user_template: placeholder {{{name}}} is not a field of the request "
                             f"(fields: {', '.join(sorted(k for k in row if not k.startswith('_')))})")
    return [{"role": "system", "content": task.system_prompt},
            {"role": "user", "content": task.user_template.format(**fields)}]


def query_text(row: dict, task: TaskSpec) -> str:
    """The text retrieval searches with (``task.retrieval_query`` fields, one per line)."""
    return "\n".join(str(row.get(f) or "") for f in task.retrieval_query)


def labels_of(row: dict, task: TaskSpec) -> dict[str, str]:
    return {f: row[f] for f in task.answer}


def answer_json(labels: dict[str, Any], task: TaskSpec) -> str:
    """A gold answer as the model must write it: compact JSON, the task's field order."""
    return dump_answer(labels, list(task.answer))


def dump_answer(labels: dict[str, Any], fields: list[str]) -> str:
    """An answer's text in ``fields`` order (training's gold answers, the endpoint's allowed answers)."""
    return json.dumps({f: labels[f] for f in fields}, ensure_ascii=False)


# ---------------------------------------------------------------- the answer's schema

def resolve_values(task: TaskSpec, tables: dict[str, Any]) -> dict[str, list[str]]:
    """Allowed values per answer field: listed ones as they are, table-bound ones from the
    tables (pandas DataFrames by name), sorted. Raises StageError naming a missing table/column."""
    out = {}
    for name, f in task.answer.items():
        if f.values is not None:
            out[name] = list(f.values)
            continue
        table, column = f.values_from.split(".")
        if table not in tables or column not in tables[table].columns:
            raise StageError(f"task.answer.{name}.values_from: no column {column!r} in table {table!r}")
        out[name] = sorted(str(v) for v in tables[table][column].dropna().unique())
    return out


def answer_schema(task: TaskSpec, values: dict[str, list[str]] | None = None) -> dict:
    """The answer's JSON Schema: an object with exactly the task's fields, each a string from
    its allowed values (a table-bound field without ``values`` is any string)."""
    values = values or {}
    props = {}
    for name, f in task.answer.items():
        allowed = f.values if f.values is not None else values.get(name)
        props[name] = {"type": "string", **({"enum": list(allowed)} if allowed else {})}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "answer", "type": "object",
            "properties": props, "required": list(task.answer), "additionalProperties": False}


class AnswerSchema:
    """A task's answer JSON Schema with the operations on answers: parse, score, rank."""

    FILE = "answer_schema.json"

    def __init__(self, schema: dict, ordered: dict[str, list[str]] | None = None):
        self.schema = schema
        self.fields = list(schema["required"])  # the answer's field order (properties may be re-sorted)
        self.ordered = ordered or {}  # field -> values lowest first, for ranked fields

    @classmethod
    def of(cls, task: TaskSpec, values: dict[str, list[str]] | None = None) -> "AnswerSchema":
        return cls(answer_schema(task, values), {n: list(f.values) for n, f in task.answer.items() if f.ordered})

    @classmethod
    def read(cls, path: Path) -> "AnswerSchema":
        try:
            doc = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise StageError(f"{path}: missing (the prepare stage writes the answer schema)") from None
        return cls(doc["schema"], doc.get("ordered", {}))

    def write(self, path: Path) -> Path:
        return write_json(path, {"schema": self.schema, "ordered": self.ordered})

    @cached_property
    def _validator(self):
        from jsonschema import Draft202012Validator

        return Draft202012Validator(self.schema)

    def values(self, field: str) -> list[str] | None:
        return self.schema["properties"][field].get("enum")

    def parse(self, text: str) -> dict | None:
        """The answer as a dict when ``text`` is exactly one JSON object valid against the
        schema (surrounding whitespace allowed), else None."""
        try:
            obj = json.loads(text.strip())
        except (json.JSONDecodeError, RecursionError):
            return None
        return obj if self._validator.is_valid(obj) else None

    def errors(self, text: str) -> list[str]:
        """Why ``text`` is not a valid answer ([] when it is)."""
        try:
            obj = json.loads(text.strip())
        except (json.JSONDecodeError, RecursionError) as exc:
            return [f"not JSON: {exc}"]
        return [f"{'/'.join(map(str, e.absolute_path)) or '(answer)'}: {e.message}"
                for e in self._validator.iter_errors(obj)]

    def rank(self, field: str, value: str) -> int | None:
        order = self.ordered.get(field, [])
        return order.index(value) if value in order else None

    def outcomes(self, golds: list[dict], answers: list[str]) -> dict[str, list[bool]]:
        """Per chat, right or not, by metric name: json_valid_rate (the answer is valid),
        <field>_accuracy per field, exact_match (every field right). What rates, their
        intervals and paired tests against another model are computed from."""
        if len(golds) != len(answers):
            raise ValueError(f"{len(golds)} gold labels but {len(answers)} answers")
        parsed = [self.parse(a) for a in answers]
        out = {"json_valid_rate": [p is not None for p in parsed]}
        for f in self.fields:
            out[f"{f}_accuracy"] = [p is not None and p[f] == g[f] for p, g in zip(parsed, golds)]
        out["exact_match"] = [p is not None and all(p[f] == g[f] for f in self.fields) for p, g in zip(parsed, golds)]
        return out

    def score(self, golds: list[dict], answers: list[str]) -> dict:
        """n, json_valid_rate, <field>_accuracy per field and exact_match of ``answers`` (raw
        model outputs) against ``golds`` (label dicts)."""
        n = len(golds)
        return {"n": n, **{k: _rate(sum(v), n) for k, v in self.outcomes(golds, answers).items()}}

    def slices(self, metas: list[dict], golds: list[dict], answers: list[str], by: list[str]) -> dict:
        """Exact match, its 95% Wilson interval and the count per value of each meta field,
        e.g. {"channel": {"email": {"n": 2, "exact_match": 0.5, "exact_match_ci": [0.09, 0.91]}}}."""
        right = self.outcomes(golds, answers)["exact_match"]
        out: dict[str, dict] = {}
        for field in by:
            groups: dict[str, list[int]] = {}
            for i, meta in enumerate(metas):
                groups.setdefault(str(meta.get(field)), []).append(i)
            out[field] = {value: {"n": len(idx), "exact_match": _rate(sum(right[i] for i in idx), len(idx)),
                                  "exact_match_ci": wilson(sum(right[i] for i in idx), len(idx))}
                          for value, idx in sorted(groups.items())}
        return out

    def confusion(self, golds: list[dict], answers: list[str], field: str) -> Counter:
        """(gold, predicted) -> count for one field; an invalid answer predicts ``(invalid)``."""
        counts: Counter = Counter()
        for gold, answer in zip(golds, answers):
            parsed = self.parse(answer)
            counts[(gold[field], parsed[field] if parsed else INVALID)] += 1
        return counts


def object_end(text: str) -> int | None:
    """Where the JSON object that ``text`` starts with (after whitespace) closes: the index
    just past its ``}``; None while it is still open. A string that does not start with
    ``{`` ends at once (0)."""
    offset = len(text) - len(text.lstrip())
    body = text[offset:]
    if not body:
        return None
    if body[0] != "{":
        return 0
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(body):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return offset + i + 1
    return None


def cannot_be_answer(text: str) -> bool:
    """True once ``text`` can no longer become exactly one JSON object, whatever follows:
    it starts with something other than ``{``, or an object closed and more text followed.
    Generation stops such rows early; their score is the same (invalid), sooner."""
    end = object_end(text)
    return end == 0 or (end is not None and bool(text[end:].strip()))


def _rate(k: int, n: int) -> float:
    return round(k / n, 4) if n else 0.0
