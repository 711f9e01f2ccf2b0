"""Messages for a spec that does not validate: each error with its file, line and key path,
what was expected, and the closest allowed key for a typo."""
from __future__ import annotations

import difflib
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


def format_errors(exc: ValidationError, raw: dict, text: str, label: str, touched: set[str],
                  root: type[BaseModel]) -> str:
    """One line per error: ``file:line: dotted.key: what was expected (got ...)``; keys set by
    ``--set`` (``touched``) say so."""
    lines_by_path = line_numbers(text)
    out = []
    for err in exc.errors():
        keys = _user_path(err["loc"], raw)
        dotted = ".".join(str(k) for k in keys)
        line = lines_by_path.get(tuple(str(k) for k in keys))
        where = f"{label}:{line}" if line else label
        origin = " (from --set)" if any(dotted == t or dotted.startswith(t + ".") or t.startswith(dotted + ".")
                                        for t in touched) else ""
        out.append(f"{where}: {dotted or '(top)'}: {_describe(err, keys, raw, root)}{origin}")
    return "\n".join(out)


def _user_path(loc: tuple, raw: Any) -> list:
    """Drop the discriminator tags pydantic puts in ``loc`` for tagged unions, keeping only
    the keys that exist in the user's document."""
    keys, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue  # the tag of a discriminated union, not a key
        keys.append(part)
        node = node.get(part) if isinstance(node, dict) else (
            node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
    return keys


def _describe(err: dict, keys: list, raw: dict, root: type[BaseModel]) -> str:
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    shown = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) or got is None else ""
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {limit:g}{shown}"
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(keys[:-1], raw, root)
        hint = difflib.get_close_matches(str(keys[-1]), allowed, n=1)
        suffix = f"; did you mean {hint[0]!r}?" if hint else (f"; allowed: {', '.join(allowed)}" if allowed else "")
        return f"unknown key{suffix}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}{shown}"
    if kind == "union_tag_invalid":
        return f"{ctx.get('discriminator')} must be one of {ctx.get('expected_tags')}{shown if not isinstance(got, dict) else ''}" \
               + (f" (got {ctx.get('tag')!r})" if isinstance(got, dict) else "")
    if kind == "union_tag_not_found":
        return f"missing {ctx.get('discriminator')} (which variant this is)"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    msg = err["msg"]
    msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
    return (msg[:1].lower() + msg[1:]) + ("" if kind == "value_error" else shown)


def _allowed_keys(keys: list, raw: dict, root: type[BaseModel]) -> list[str]:
    """Field names of the model at ``keys`` (following the user's data through dicts,
    lists and tagged unions); [] when it cannot tell."""
    tp: Any = root
    node: Any = raw
    for k in keys:
        tp = _pick_model(tp, node)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = _fields_by_key(tp).get(str(k))
            if field is None:
                return []
            tp = field.annotation
        else:
            args = typing.get_args(tp)
            tp = args[-1] if args else None
        node = node.get(k) if isinstance(node, dict) else None
    tp = _pick_model(tp, node)
    return sorted(_fields_by_key(tp)) if isinstance(tp, type) and issubclass(tp, BaseModel) else []


def _fields_by_key(model: type[BaseModel]) -> dict:
    """A model's fields by the key users write (the alias where there is one)."""
    return {(f.alias or name): f for name, f in model.model_fields.items()}


def _pick_model(tp: Any, node: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _pick_model(typing.get_args(tp)[0], node)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        for member in members:
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and isinstance(node, dict) and kind.default == node.get("kind"):
                return member
        return members[0] if len(members) == 1 else tp
    return tp


def line_numbers(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML text to its 1-based line number."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    found: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = prefix + (str(key.value),)
                found[path] = key.start_mark.line + 1
                walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                found[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    if root is not None:
        walk(root, ())
    return found
