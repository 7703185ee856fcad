"""Strict structured outputs: build the ``response_format``, parse and validate the reply.

From a pydantic model or a JSON Schema dict, :func:`structured_output_format` builds the
``response_format`` of OpenAI's strict JSON Schema mode, which accepts only a subset of
JSON Schema: every object has ``additionalProperties: false``, every property is listed
in ``required`` (an optional field is expressed as nullable), ``$ref`` has no siblings,
``allOf`` has no single entry, ``default: null`` is dropped. The conversion follows
openai-python's ``to_strict_json_schema`` (a test compares both on a set of models).

:func:`parse_structured` turns the reply back into a validated pydantic instance (or a
checked dict), with a typed error for each way it can go wrong: not JSON or not matching
(:class:`~ai_guard.errors.StructuredOutputError`), cut at the token limit
(:class:`~ai_guard.errors.StructuredOutputTruncatedError`), refused by the model
(:class:`~ai_guard.errors.StructuredOutputRefusalError`)::

    class Answer(BaseModel):
        city: str
        population: int | None

    body["response_format"] = structured_output_format("answer", Answer)
    ...
    answer = parse_structured(result, Answer)     # an Answer, or a typed error
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ValidationError

from ai_guard.errors import (
    ConfigError,
    StructuredOutputError,
    StructuredOutputRefusalError,
    StructuredOutputTruncatedError,
)
from ai_guard.types import ChatResult

__all__ = [
    "SchemaInput",
    "json_schema_of",
    "parse_structured",
    "schema_name",
    "strict_schema_errors",
    "structured_output_format",
    "to_strict_json_schema",
    "validate_json_value",
]

M = TypeVar("M", bound=BaseModel)
#: What the functions here accept as a schema: a pydantic model class or a JSON Schema.
SchemaInput = type[BaseModel] | Mapping[str, Any]

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_-]+")
_JSON_TYPES = frozenset(("string", "number", "integer", "boolean", "object", "array", "null"))
# $ref hops allowed without descending into the value: deeper means a circular $ref.
_MAX_REF_HOPS = 64


def _is_model(schema: object) -> bool:
    return isinstance(schema, type) and issubclass(schema, BaseModel)


def json_schema_of(schema: SchemaInput) -> dict[str, Any]:
    """A fresh JSON Schema dict for ``schema``: pydantic's ``model_json_schema()`` for a
    model class, a deep copy for a dict (checked to be JSON). Anything else raises
    :class:`~ai_guard.errors.ConfigError`."""
    if _is_model(schema):
        model: type[BaseModel] = schema  # type: ignore[assignment]
        return model.model_json_schema()
    if isinstance(schema, Mapping):
        try:
            # A JSON round trip both deep-copies and proves the schema is plain JSON.
            result = json.loads(json.dumps(schema, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError("schema", schema, f"a JSON Schema must be plain JSON: {exc}")
        if not isinstance(result, dict):
            raise ConfigError("schema", schema, "a JSON Schema must be an object")
        return result
    raise ConfigError("schema", schema, "expected a pydantic model class or a JSON Schema dict")


def schema_name(schema: SchemaInput) -> str:
    """A ``response_format`` name for ``schema``: the model's class name or the schema's
    ``title``, reduced to ``[a-zA-Z0-9_-]`` and 64 characters (``"response"`` when there
    is nothing usable). For callers that do not want to name their schema."""
    raw = schema.__name__ if _is_model(schema) else None  # type: ignore[union-attr]
    if raw is None and isinstance(schema, Mapping) and isinstance(schema.get("title"), str):
        raw = schema["title"]
    cleaned = _NAME_UNSAFE.sub("_", raw or "").strip("_")[:64]
    return cleaned or "response"


# -- strict conversion -------------------------------------------------------------------


def _resolve_ref(root: Mapping[str, Any], ref: Any, path: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise ConfigError(
            "schema", ref, f"at {_where(path)}: only local $ref starting with '#/' are supported"
        )
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError("schema", ref, f"at {_where(path)}: $ref cannot be resolved")
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError("schema", ref, f"at {_where(path)}: $ref does not point to a schema")
    return node


def _where(path: tuple[str, ...]) -> str:
    return "/" + "/".join(path) if path else "the root"


def _accepts_null(schema: Any) -> bool:
    if not isinstance(schema, Mapping) or not schema:
        return True
    kind = schema.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    if "const" in schema and schema["const"] is None:
        return True
    enum = schema.get("enum")
    if isinstance(enum, list) and None in enum:
        return True
    any_of = schema.get("anyOf")
    return isinstance(any_of, list) and any(_accepts_null(v) for v in any_of)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` widened to accept ``null`` (an optional property in strict mode)."""
    if _accepts_null(schema):
        return schema
    kind = schema.get("type")
    any_of = schema.get("anyOf")
    if isinstance(any_of, list) and set(schema) <= {"anyOf", "description", "title"}:
        return {**schema, "anyOf": [*any_of, {"type": "null"}]}
    if isinstance(kind, str) and "$ref" not in schema and "anyOf" not in schema:
        widened = {**schema, "type": [kind, "null"]}
        if isinstance(schema.get("enum"), list):
            widened["enum"] = [*schema["enum"], None]
        return widened
    if isinstance(kind, list) and "$ref" not in schema:
        widened = {**schema, "type": [*kind, "null"]}
        if isinstance(schema.get("enum"), list):
            widened["enum"] = [*schema["enum"], None]
        return widened
    return {"anyOf": [schema, {"type": "null"}]}


def _ensure_strict(
    node: Any, *, path: tuple[str, ...], root: dict[str, Any], optional_nullable: bool
) -> dict[str, Any]:
    # Mirrors openai-python's _ensure_strict_json_schema (mutating ``node`` in place, which
    # is a private copy), plus optional-as-nullable for schemas written by hand.
    if not isinstance(node, dict):
        raise ConfigError("schema", node, f"at {_where(path)}: expected a JSON Schema object")

    def strict(sub: Any, *more: str) -> dict[str, Any]:
        return _ensure_strict(
            sub, path=(*path, *more), root=root, optional_nullable=optional_nullable
        )

    for defs_key in ("$defs", "definitions"):
        defs = node.get(defs_key)
        if isinstance(defs, dict):
            for def_name, def_schema in defs.items():
                strict(def_schema, defs_key, def_name)

    if node.get("type") == "object" and "additionalProperties" not in node:
        node["additionalProperties"] = False

    properties = node.get("properties")
    if isinstance(properties, dict):
        declared = node.get("required")
        required = set(declared) if isinstance(declared, list) else set()
        node["required"] = list(properties)
        strict_properties: dict[str, Any] = {}
        for key, prop in properties.items():
            converted = strict(prop, "properties", key)
            if optional_nullable and key not in required:
                converted = _nullable(converted)
            strict_properties[key] = converted
        node["properties"] = strict_properties

    items = node.get("items")
    if isinstance(items, dict):
        node["items"] = strict(items, "items")

    any_of = node.get("anyOf")
    if isinstance(any_of, list):
        node["anyOf"] = [strict(v, "anyOf", str(i)) for i, v in enumerate(any_of)]

    all_of = node.get("allOf")
    if isinstance(all_of, list):
        if len(all_of) == 1:
            node.update(strict(all_of[0], "allOf", "0"))
            node.pop("allOf")
        else:
            node["allOf"] = [strict(v, "allOf", str(i)) for i, v in enumerate(all_of)]

    if "default" in node and node["default"] is None:
        node.pop("default")

    ref = node.get("$ref")
    if ref is not None and len(node) > 1:
        # Strict mode refuses a $ref with siblings ({"$ref": ..., "description": ...}):
        # inline the target, the siblings taking priority, and make the result strict.
        resolved = copy.deepcopy(_resolve_ref(root, ref, path))
        node.update({**resolved, **node})
        node.pop("$ref")
        return _ensure_strict(node, path=path, root=root, optional_nullable=optional_nullable)
    if ref is not None:
        _resolve_ref(root, ref, path)  # a $ref that leads nowhere is an error now, not later
    return node


def to_strict_json_schema(schema: SchemaInput) -> dict[str, Any]:
    """The strict-mode JSON Schema of ``schema`` (a new dict; the input is not touched).

    For a pydantic model the result equals openai-python's ``to_strict_json_schema``:
    ``Optional[X]`` fields are already nullable; a field with a non-``None`` default
    becomes required (the model must then send a value that validates). For a JSON Schema
    dict, a property missing from ``required`` becomes nullable as well, since strict mode
    expresses "optional" that way.
    """
    document = json_schema_of(schema)
    return _ensure_strict(document, path=(), root=document, optional_nullable=not _is_model(schema))


def strict_schema_errors(schema: Mapping[str, Any]) -> list[str]:
    """What OpenAI's strict mode would reject in ``schema`` (empty when acceptable):
    a root that is not an object, an object without ``additionalProperties: false``, a
    property missing from ``required``, an unknown ``type``, a ``$ref`` that does not
    resolve. Messages follow the API's wording (``In context=(...), ...``)."""
    problems: list[str] = []
    if schema.get("type") != "object" or "anyOf" in schema:
        problems.append(
            f"schema must be a JSON Schema of 'type: \"object\"', got "
            f"'type: \"{schema.get('type')}\"'."
        )

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, Mapping):
            if not isinstance(node, bool):
                problems.append(f"In context={path}, schema must be an object or a boolean.")
            return
        context = f"In context={path}"
        kind = node.get("type")
        kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
        for k in kinds:
            if k not in _JSON_TYPES:
                problems.append(f"{context}, type {k!r} is not a JSON Schema type.")
        if "object" in kinds or "properties" in node:
            if node.get("additionalProperties") is not False:
                problems.append(
                    f"{context}, 'additionalProperties' is required to be supplied and to be false."
                )
            properties = node.get("properties")
            if isinstance(properties, Mapping):
                required = node.get("required")
                listed = set(required) if isinstance(required, list) else set()
                missing = [key for key in properties if key not in listed]
                if missing:
                    problems.append(
                        f"{context}, 'required' is required to be supplied and to be an array "
                        f"including every key in properties. Missing '{missing[0]}'."
                    )
                for key, sub in properties.items():
                    visit(sub, (*path, "properties", key))
        ref = node.get("$ref")
        if ref is not None:
            try:
                _resolve_ref(schema, ref, path)
            except ConfigError:
                problems.append(f"{context}, reference {ref!r} was not found in the schema.")
        for key in ("items", "additionalProperties"):
            sub = node.get(key)
            if isinstance(sub, Mapping):
                visit(sub, (*path, key))
        for key in ("anyOf", "allOf", "oneOf", "prefixItems"):
            variants = node.get(key)
            if isinstance(variants, list):
                for index, sub in enumerate(variants):
                    visit(sub, (*path, key, str(index)))
        for key in ("$defs", "definitions"):
            defs = node.get(key)
            if isinstance(defs, Mapping):
                for name, sub in defs.items():
                    visit(sub, (*path, key, name))

    visit(schema, ())
    return problems


def structured_output_format(
    name: str,
    schema: SchemaInput,
    strict: bool = True,
    *,
    description: str | None = None,
) -> dict[str, Any]:
    """The ``response_format`` for a chat request that must answer with ``schema``::

        {"type": "json_schema",
         "json_schema": {"name": name, "schema": {...}, "strict": True}}

    ``schema`` is a pydantic model class or a JSON Schema dict. With ``strict`` (the
    default) the schema is converted by :func:`to_strict_json_schema` and checked by
    :func:`strict_schema_errors`; what strict mode cannot express (a ``dict[str, int]``
    field, a root that is not an object) raises :class:`~ai_guard.errors.ConfigError` here
    rather than a 400 from the upstream. ``name`` must match ``^[a-zA-Z0-9_-]{1,64}$``.
    The schema of a model class is computed once (the result is a fresh dict each time).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError("name", name, "must match ^[a-zA-Z0-9_-]{1,64}$")
    if _is_model(schema):
        # A fresh copy of the model's schema, computed once per class: pydantic's schema
        # generation costs far more than decoding its JSON text.
        document = json.loads(_model_schema_text(schema, bool(strict)))
    else:
        document = _schema_document(schema, bool(strict))
    spec: dict[str, Any] = {"name": name, "schema": document, "strict": bool(strict)}
    if description is not None:
        spec["description"] = description
    return {"type": "json_schema", "json_schema": spec}


def _schema_document(schema: SchemaInput, strict: bool) -> dict[str, Any]:
    if not strict:
        return json_schema_of(schema)
    document = to_strict_json_schema(schema)
    problems = strict_schema_errors(document)
    if problems:
        raise ConfigError(
            "schema", schema, f"strict structured outputs cannot use it: {problems[0]}"
        )
    return document


@functools.lru_cache(maxsize=256)
def _model_schema_text(model: type[BaseModel], strict: bool) -> str:
    return json.dumps(_schema_document(model, strict))


# -- validation of a JSON value against a JSON Schema ------------------------------------


def _type_matches(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "null":
        return value is None
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, int | float)
    return False


def _error(kind: str, loc: tuple[str | int, ...], msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg, "input": value}


def validate_json_value(
    value: Any, schema: Mapping[str, Any] | bool, *, root: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Check a decoded JSON value against a JSON Schema; return the errors (empty when it
    conforms), each ``{"type", "loc", "msg", "input"}`` like pydantic's.

    A small checker for the subset structured outputs use: ``type`` (one or a list),
    ``enum``, ``const``, ``properties``/``required``/``additionalProperties``, ``items``/
    ``prefixItems``, ``minItems``/``maxItems``, ``minLength``/``maxLength``/``pattern``,
    numeric bounds and ``multipleOf``, ``anyOf``/``oneOf``/``allOf``, local ``$ref``.
    ``format`` is an annotation (not checked), as JSON Schema specifies by default.
    """
    document = root if root is not None else (schema if isinstance(schema, Mapping) else {})
    errors: list[dict[str, Any]] = []
    _validate(value, schema, document, (), errors, 0)
    return errors


def _validate(
    value: Any,
    schema: Any,
    root: Mapping[str, Any],
    loc: tuple[str | int, ...],
    errors: list[dict[str, Any]],
    hops: int,
) -> None:
    if schema is True or schema is None:
        return
    if schema is False:
        errors.append(_error("false_schema", loc, "no value is allowed here", value))
        return
    if not isinstance(schema, Mapping):
        errors.append(_error("invalid_schema", loc, "the schema is not an object", value))
        return
    ref = schema.get("$ref")
    if ref is not None:
        if hops >= _MAX_REF_HOPS:
            errors.append(_error("invalid_schema", loc, "circular $ref", value))
            return
        try:
            target = _resolve_ref(root, ref, tuple(str(p) for p in loc))
        except ConfigError as exc:
            errors.append(_error("invalid_schema", loc, exc.reason, value))
            return
        _validate(value, target, root, loc, errors, hops + 1)

    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(isinstance(k, str) and _type_matches(value, k) for k in kinds):
            wanted = " or ".join(str(k) for k in kinds)
            errors.append(_error(f"{kinds[0]}_type", loc, f"Input should be {wanted}", value))
            return
    if "const" in schema and not _json_equal(value, schema["const"]):
        errors.append(_error("const", loc, f"Input should be {schema['const']!r}", value))
    enum = schema.get("enum")
    if isinstance(enum, list) and not any(_json_equal(value, option) for option in enum):
        shown = ", ".join(repr(option) for option in enum[:10])
        errors.append(_error("enum", loc, f"Input should be one of {shown}", value))

    any_of = schema.get("anyOf")
    if isinstance(any_of, list) and not any(
        not _errors_of(value, variant, root, loc, hops) for variant in any_of
    ):
        errors.append(_error("any_of", loc, "Input matches none of the allowed schemas", value))
    one_of = schema.get("oneOf")
    if isinstance(one_of, list):
        matches = sum(1 for variant in one_of if not _errors_of(value, variant, root, loc, hops))
        if matches != 1:
            errors.append(
                _error("one_of", loc, f"Input should match exactly one schema ({matches})", value)
            )
    all_of = schema.get("allOf")
    if isinstance(all_of, list):
        for variant in all_of:
            _validate(value, variant, root, loc, errors, hops)

    if isinstance(value, dict):
        _validate_object(value, schema, root, loc, errors)
    elif isinstance(value, list):
        _validate_array(value, schema, root, loc, errors)
    elif isinstance(value, str):
        _validate_string(value, schema, loc, errors)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        _validate_number(value, schema, loc, errors)


def _errors_of(
    value: Any, schema: Any, root: Mapping[str, Any], loc: tuple[str | int, ...], hops: int
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    _validate(value, schema, root, loc, found, hops)
    return found


def _json_equal(a: Any, b: Any) -> bool:
    # JSON equality: true is not 1, 1.0 is 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _validate_object(
    value: dict[str, Any],
    schema: Mapping[str, Any],
    root: Mapping[str, Any],
    loc: tuple[str | int, ...],
    errors: list[dict[str, Any]],
) -> None:
    properties = schema.get("properties")
    properties = properties if isinstance(properties, Mapping) else {}
    required = schema.get("required")
    if isinstance(required, list):
        for name in required:
            if name not in value:
                errors.append(_error("missing", (*loc, name), "Field required", value))
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            _validate(item, properties[name], root, (*loc, name), errors, 0)
        elif extra is False:
            errors.append(
                _error("extra_forbidden", (*loc, name), "Extra inputs are not permitted", item)
            )
        elif isinstance(extra, Mapping):
            _validate(item, extra, root, (*loc, name), errors, 0)


def _validate_array(
    value: list[Any],
    schema: Mapping[str, Any],
    root: Mapping[str, Any],
    loc: tuple[str | int, ...],
    errors: list[dict[str, Any]],
) -> None:
    low, high = schema.get("minItems"), schema.get("maxItems")
    if isinstance(low, int) and len(value) < low:
        errors.append(_error("too_short", loc, f"List should have at least {low} items", value))
    if isinstance(high, int) and len(value) > high:
        errors.append(_error("too_long", loc, f"List should have at most {high} items", value))
    prefix = schema.get("prefixItems")
    prefix = prefix if isinstance(prefix, list) else []
    items = schema.get("items")
    for index, item in enumerate(value):
        if index < len(prefix):
            _validate(item, prefix[index], root, (*loc, index), errors, 0)
        elif items is not None:
            _validate(item, items, root, (*loc, index), errors, 0)


def _validate_string(
    value: str, schema: Mapping[str, Any], loc: tuple[str | int, ...], errors: list[dict[str, Any]]
) -> None:
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) and len(value) < low:
        errors.append(_error("string_too_short", loc, f"at least {low} characters", value))
    if isinstance(high, int) and len(value) > high:
        errors.append(_error("string_too_long", loc, f"at most {high} characters", value))
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            matched = re.search(pattern, value) is not None
        except re.error:
            matched = True  # a pattern Python cannot read is not the reply's fault
        if not matched:
            errors.append(_error("string_pattern_mismatch", loc, f"should match {pattern}", value))


def _validate_number(
    value: float,
    schema: Mapping[str, Any],
    loc: tuple[str | int, ...],
    errors: list[dict[str, Any]],
) -> None:
    def bound(key: str) -> float | None:
        raw = schema.get(key)
        return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None

    minimum, maximum = bound("minimum"), bound("maximum")
    exclusive_min, exclusive_max = bound("exclusiveMinimum"), bound("exclusiveMaximum")
    if minimum is not None and value < minimum:
        errors.append(_error("greater_than_equal", loc, f"should be >= {minimum:g}", value))
    if maximum is not None and value > maximum:
        errors.append(_error("less_than_equal", loc, f"should be <= {maximum:g}", value))
    if exclusive_min is not None and value <= exclusive_min:
        errors.append(_error("greater_than", loc, f"should be > {exclusive_min:g}", value))
    if exclusive_max is not None and value >= exclusive_max:
        errors.append(_error("less_than", loc, f"should be < {exclusive_max:g}", value))
    step = bound("multipleOf")
    if step is not None and step > 0:
        ratio = value / step
        if math.isfinite(ratio) and not math.isclose(ratio, round(ratio), abs_tol=1e-9):
            errors.append(_error("multiple_of", loc, f"should be a multiple of {step:g}", value))


# -- parsing a reply ---------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _refusal_of(raw: Mapping[str, Any]) -> str | None:
    choices = raw.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        message = choices[0].get("message")
        if isinstance(message, Mapping) and isinstance(message.get("refusal"), str):
            return str(message["refusal"])
    return None


@overload
def parse_structured(
    content: str | ChatResult | None,
    schema: type[M],
    *,
    finish_reason: str | None = None,
    refusal: str | None = None,
) -> M: ...


@overload
def parse_structured(
    content: str | ChatResult | None,
    schema: Mapping[str, Any],
    *,
    finish_reason: str | None = None,
    refusal: str | None = None,
) -> Any: ...


def parse_structured(
    content: str | ChatResult | None,
    schema: type[BaseModel] | Mapping[str, Any],
    *,
    finish_reason: str | None = None,
    refusal: str | None = None,
) -> Any:
    """Parse a structured reply into a validated value.

    ``content`` is the reply text, or a :class:`~ai_guard.types.ChatResult` (its finish
    reason and ``message.refusal`` are then read too). With a pydantic model class the
    result is an instance (validated by pydantic from the JSON text); with a JSON Schema
    dict it is the decoded JSON, checked by :func:`validate_json_value`.

    Raises, in this order:

    - :class:`~ai_guard.errors.StructuredOutputRefusalError` when the model refused
      (``refusal`` given or found in the result);
    - :class:`~ai_guard.errors.StructuredOutputTruncatedError` when
      ``finish_reason == "length"`` (the JSON was cut at the token limit);
    - :class:`~ai_guard.errors.StructuredOutputError` when the text is not JSON (empty
      ``errors``) or does not match the schema (``errors`` lists each mismatch); the raw
      text is in ``content``.
    """
    text: str | None
    if isinstance(content, ChatResult):
        finish_reason = finish_reason or content.finish_reason
        refusal = refusal or _refusal_of(content.raw)
        text = content.content
    else:
        text = content
    if refusal:
        raise StructuredOutputRefusalError(
            f"the model refused to answer: {refusal}", content=text or "", refusal=refusal
        )
    if finish_reason == "length":
        raise StructuredOutputTruncatedError(
            "the reply was cut at the token limit (finish_reason='length'); raise max_tokens",
            content=text or "",
        )
    if not isinstance(text, str):
        raise StructuredOutputError(
            f"the reply has no text content (got {type(text).__name__})", content=""
        )
    if _is_model(schema):
        return _parse_model(text, schema)  # type: ignore[arg-type]
    if not isinstance(schema, Mapping):
        raise ConfigError("schema", schema, "expected a pydantic model class or a JSON Schema dict")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise StructuredOutputError(f"the reply is not valid JSON: {exc}", content=text) from None
    errors = validate_json_value(value, schema)
    if errors:
        raise StructuredOutputError(
            _mismatch_message(errors, "the schema"), content=text, errors=errors
        )
    return value


def _parse_model(text: str, model: type[M]) -> M:
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(error["type"] == "json_invalid" for error in errors):
            detail = errors[0].get("msg", "")
            raise StructuredOutputError(
                f"the reply is not valid JSON: {detail}", content=text
            ) from None
        raise StructuredOutputError(
            _mismatch_message(errors, model.__name__), content=text, errors=errors
        ) from None


def _mismatch_message(errors: Sequence[Mapping[str, Any]], target: str) -> str:
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "the root"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"the reply does not match {target}: {where}: {first.get('msg')}{more}"
