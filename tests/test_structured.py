"""Strict structured outputs: the response_format, its schema, parsing the reply."""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
from enum import Enum
from typing import Annotated, Any, Literal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.lib._parsing._completions import type_to_response_format_param
from openai.lib._pydantic import to_strict_json_schema as openai_to_strict_json_schema
from pydantic import BaseModel, Field

from ai_guard.errors import (
    ConfigError,
    StructuredOutputError,
    StructuredOutputRefusalError,
    StructuredOutputTruncatedError,
)
from ai_guard.structured import (
    parse_structured,
    schema_name,
    strict_schema_errors,
    structured_output_format,
    to_strict_json_schema,
    validate_json_value,
)
from ai_guard.testing._upstream_behaviour import value_from_schema
from ai_guard.types import ChatResult

# -- models covering what openai-python's conversion handles -----------------------------


class Colour(str, Enum):
    RED = "red"
    BLUE = "blue"


class Priority(int, Enum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    street: str
    city: str
    postcode: str | None = None


class Person(BaseModel):
    name: str
    age: int
    address: Address
    previous: list[Address]
    favourite: Colour


class Described(BaseModel):
    """A model whose nested field has a description: a $ref with siblings."""

    home: Address = Field(description="where they live")
    work: Address | None = Field(default=None, description="where they work")


class Optionals(BaseModel):
    nickname: str | None = None
    score: float | None
    level: int = 5
    flags: list[bool] = Field(default_factory=list)


class Unions(BaseModel):
    value: int | str
    either: Address | Person
    maybe: Colour | None = None


class Literals(BaseModel):
    mode: Literal["fast", "slow"]
    priority: Priority
    when: dt.datetime
    day: dt.date


class Tree(BaseModel):
    label: str
    children: list[Tree]


class Constrained(BaseModel):
    code: Annotated[str, Field(min_length=2, max_length=5)]
    count: Annotated[int, Field(ge=0, le=10)]
    ratio: Annotated[float, Field(gt=0, lt=1)]
    items: Annotated[list[int], Field(min_length=1, max_length=3)]


class Deep(BaseModel):
    people: list[Person]
    tree: Tree
    described: Described
    unions: list[Unions]


MODELS: list[type[BaseModel]] = [
    Address,
    Person,
    Described,
    Optionals,
    Unions,
    Literals,
    Tree,
    Constrained,
    Deep,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_model_schema_equals_openai_python(model: type[BaseModel]) -> None:
    assert to_strict_json_schema(model) == openai_to_strict_json_schema(model)
    assert structured_output_format(model.__name__, model) == type_to_response_format_param(model)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_model_schema_passes_the_strict_checks(model: type[BaseModel]) -> None:
    assert strict_schema_errors(to_strict_json_schema(model)) == []


def test_ref_with_description_is_expanded() -> None:
    schema = to_strict_json_schema(Described)
    home = schema["properties"]["home"]
    assert "$ref" not in home
    assert home["description"] == "where they live"
    assert home["additionalProperties"] is False
    assert home["required"] == ["street", "city", "postcode"]


def test_optional_field_is_required_nullable_and_loses_its_none_default() -> None:
    schema = to_strict_json_schema(Optionals)
    assert schema["required"] == ["nickname", "score", "level", "flags"]
    nickname = schema["properties"]["nickname"]
    assert {"type": "null"} in nickname["anyOf"]
    assert "default" not in nickname
    assert schema["properties"]["level"]["default"] == 5


# -- dict schemas ------------------------------------------------------------------------

HAND_WRITTEN: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer", "default": None},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
        "main": {"$ref": "#/$defs/Tag", "description": "the main tag"},
        "rating": {"allOf": [{"$ref": "#/$defs/Rating"}]},
        "status": {"enum": ["draft", "done"]},
    },
    "required": ["title", "tags"],
    "$defs": {
        "Tag": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "weight": {"type": "number"}},
            "required": ["name"],
        },
        "Rating": {"type": "integer", "minimum": 1, "maximum": 5},
    },
}


def test_dict_schema_becomes_strict() -> None:
    original = copy.deepcopy(HAND_WRITTEN)
    schema = to_strict_json_schema(HAND_WRITTEN)
    assert original == HAND_WRITTEN  # the input is not touched
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["title", "year", "tags", "main", "rating", "status"]
    # what was optional is now nullable
    assert schema["properties"]["title"] == {"type": "string"}
    assert schema["properties"]["year"] == {"type": ["integer", "null"]}
    assert schema["properties"]["status"] == {
        "anyOf": [{"enum": ["draft", "done"]}, {"type": "null"}]
    }
    tag = schema["$defs"]["Tag"]
    assert tag["additionalProperties"] is False
    assert tag["required"] == ["name", "weight"]
    assert tag["properties"]["weight"] == {"type": ["number", "null"]}
    # a $ref with a sibling is inlined; the single allOf is merged
    main = schema["properties"]["main"]
    assert "$ref" not in main
    assert main["description"] == "the main tag"
    assert main["required"] == ["name", "weight"]
    rating = schema["properties"]["rating"]
    assert "allOf" not in rating
    assert "anyOf" in rating  # optional -> nullable around the merged $ref
    assert strict_schema_errors(schema) == []


def test_already_nullable_optional_is_left_alone() -> None:
    schema = to_strict_json_schema(
        {
            "type": "object",
            "properties": {
                "a": {"type": ["string", "null"]},
                "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "c": {"enum": ["x", None]},
            },
        }
    )
    assert schema["properties"] == {
        "a": {"type": ["string", "null"]},
        "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "c": {"enum": ["x", None]},
    }


def test_nullable_enum_with_type_accepts_null_in_both() -> None:
    schema = to_strict_json_schema(
        {"type": "object", "properties": {"e": {"type": "string", "enum": ["a", "b"]}}}
    )
    prop = schema["properties"]["e"]
    assert prop == {"type": ["string", "null"], "enum": ["a", "b", None]}
    assert validate_json_value({"e": None}, schema) == []
    assert validate_json_value({"e": "c"}, schema) != []


def test_response_format_shape() -> None:
    response_format = structured_output_format("movie", HAND_WRITTEN, description="a film")
    assert response_format["type"] == "json_schema"
    spec = response_format["json_schema"]
    assert spec["name"] == "movie"
    assert spec["strict"] is True
    assert spec["description"] == "a film"
    assert spec["schema"]["additionalProperties"] is False


def test_non_strict_keeps_the_schema_as_given() -> None:
    response_format = structured_output_format("movie", HAND_WRITTEN, strict=False)
    assert response_format["json_schema"]["strict"] is False
    assert response_format["json_schema"]["schema"] == HAND_WRITTEN
    assert response_format["json_schema"]["schema"] is not HAND_WRITTEN


@pytest.mark.parametrize("name", ["", "has space", "x" * 65, "naïve", "a.b", 42, None])
def test_bad_name_is_a_config_error(name: Any) -> None:
    with pytest.raises(ConfigError) as info:
        structured_output_format(name, Address)
    assert info.value.setting == "name"


@pytest.mark.parametrize("name", ["a", "A_b-9", "x" * 64])
def test_good_names_are_accepted(name: str) -> None:
    assert structured_output_format(name, Address)["json_schema"]["name"] == name


class NotAModel:
    pass


class WithDict(BaseModel):
    counts: dict[str, int]


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (["not", "a", "schema"], "pydantic model class or a JSON Schema dict"),
        ("string", "pydantic model class or a JSON Schema dict"),
        (NotAModel, "pydantic model class or a JSON Schema dict"),
        ({"type": "object", "properties": {"a": {1, 2}}}, "plain JSON"),
        ({"type": "number", "maximum": float("nan")}, "plain JSON"),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
            "cannot be resolved",
        ),
        ({"type": "object", "properties": {"a": {"$ref": "http://x/y"}}}, "local $ref"),
        ({"type": "object", "properties": {"a": "string"}}, "expected a JSON Schema object"),
        ({"type": "array", "items": {"type": "string"}}, 'type: "object"'),
        (WithDict, "additionalProperties"),
    ],
)
def test_invalid_schema_input_is_a_clear_config_error(schema: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        structured_output_format("out", schema)
    assert info.value.setting == "schema"
    assert reason in str(info.value)


def test_schema_name_helper() -> None:
    assert schema_name(Person) == "Person"
    assert schema_name({"title": "My Answer!"}) == "My_Answer"
    assert schema_name({"type": "object"}) == "response"
    assert len(schema_name({"title": "t" * 100})) == 64


def test_strict_schema_errors_speak_like_the_api() -> None:
    problems = strict_schema_errors(
        {
            "type": "object",
            "properties": {
                "a": {"type": "string"},
                "b": {"type": "object", "properties": {"c": {"type": "wat"}}},
            },
            "required": ["a"],
            "additionalProperties": False,
        }
    )
    assert problems == [
        "In context=(), 'required' is required to be supplied and to be an array including "
        "every key in properties. Missing 'b'.",
        "In context=('properties', 'b'), 'additionalProperties' is required to be supplied "
        "and to be false.",
        "In context=('properties', 'b'), 'required' is required to be supplied and to be an "
        "array including every key in properties. Missing 'c'.",
        "In context=('properties', 'b', 'properties', 'c'), type 'wat' is not a JSON Schema type.",
    ]


# -- parsing -----------------------------------------------------------------------------


def test_valid_reply_parses_into_the_model() -> None:
    content = json.dumps(
        {
            "name": "Ada",
            "age": 36,
            "address": {"street": "1 Main", "city": "London", "postcode": None},
            "previous": [],
            "favourite": "blue",
        }
    )
    person = parse_structured(content, Person)
    assert isinstance(person, Person)
    assert person.favourite is Colour.BLUE
    assert person.address.city == "London"


def test_invalid_json_is_a_structured_output_error_with_the_raw_content() -> None:
    with pytest.raises(StructuredOutputError) as info:
        parse_structured('{"name": "Ada", ', Person)
    assert type(info.value) is StructuredOutputError
    assert info.value.content == '{"name": "Ada", '
    assert info.value.errors == []
    assert "not valid JSON" in str(info.value)


def test_schema_mismatch_lists_pydantic_errors() -> None:
    content = json.dumps({"name": "Ada", "age": "old", "previous": [], "favourite": "green"})
    with pytest.raises(StructuredOutputError) as info:
        parse_structured(content, Person)
    locs = {tuple(error["loc"]) for error in info.value.errors}
    assert locs == {("age",), ("address",), ("favourite",)}
    assert info.value.content == content
    assert "does not match Person" in str(info.value)
    assert "(and 2 more)" in str(info.value)


def test_length_finish_reason_is_a_truncated_error() -> None:
    with pytest.raises(StructuredOutputTruncatedError) as info:
        parse_structured('{"name": "Ad', Person, finish_reason="length")
    assert info.value.content == '{"name": "Ad'
    assert isinstance(info.value, StructuredOutputError)


def test_refusal_is_a_distinct_error() -> None:
    with pytest.raises(StructuredOutputRefusalError) as info:
        parse_structured(None, Person, refusal="I can't help with that.")
    assert info.value.refusal == "I can't help with that."
    assert isinstance(info.value, StructuredOutputError)


def test_chat_result_is_read_for_content_finish_reason_and_refusal() -> None:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "choices": [
            {
                "message": {"content": json.dumps({"street": "s", "city": "c", "postcode": None})},
                "finish_reason": "stop",
            }
        ],
    }
    assert parse_structured(ChatResult.from_openai(body), Address).city == "c"
    cut = {**body, "choices": [{**body["choices"][0], "finish_reason": "length"}]}
    with pytest.raises(StructuredOutputTruncatedError):
        parse_structured(ChatResult.from_openai(cut), Address)
    refused = {
        "choices": [{"message": {"content": None, "refusal": "no"}, "finish_reason": "stop"}]
    }
    with pytest.raises(StructuredOutputRefusalError):
        parse_structured(ChatResult.from_openai(refused), Address)


def test_missing_content_is_a_structured_output_error() -> None:
    with pytest.raises(StructuredOutputError, match="no text content"):
        parse_structured(None, Address)


def test_dict_schema_returns_the_checked_value() -> None:
    schema = to_strict_json_schema(HAND_WRITTEN)
    value = {
        "title": "Heat",
        "year": 1995,
        "tags": [{"name": "crime", "weight": None}],
        "main": {"name": "crime", "weight": 0.5},
        "rating": 5,
        "status": None,
    }
    assert parse_structured(json.dumps(value), schema) == value
    with pytest.raises(StructuredOutputError) as info:
        parse_structured(json.dumps({**value, "rating": 9, "extra": 1}), schema)
    assert {tuple(e["loc"]) for e in info.value.errors} == {("rating",), ("extra",)}


@pytest.mark.parametrize("text", ["NaN", '{"a": Infinity}', "[" * 100_000, "", "nul"])
def test_non_json_for_dict_schema_is_a_structured_output_error(text: str) -> None:
    with pytest.raises(StructuredOutputError) as info:
        parse_structured(text, {"type": "object"})
    assert info.value.errors == []


def test_deeply_nested_reply_is_an_error_not_a_crash() -> None:
    with pytest.raises(StructuredOutputError):
        parse_structured("[" * 100_000 + "]" * 100_000, Tree)
    nested = '{"label": "x", "children": [' * 300 + "]}" * 300
    with pytest.raises(StructuredOutputError):
        parse_structured(nested, Tree)


def test_bad_schema_argument_to_parse_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        parse_structured("{}", ["not a schema"])  # type: ignore[call-overload]


# -- the small JSON Schema checker -------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "schema", "valid"),
    [
        (1, {"type": "integer"}, True),
        (1.0, {"type": "integer"}, True),
        (1.5, {"type": "integer"}, False),
        (True, {"type": "integer"}, False),
        (True, {"type": "number"}, False),
        (2, {"type": "number"}, True),
        (None, {"type": ["string", "null"]}, True),
        ("x", {"enum": ["x", "y"]}, True),
        (1, {"enum": [True]}, False),
        (True, {"const": True}, True),
        ("ab", {"type": "string", "minLength": 3}, False),
        ("abcd", {"type": "string", "maxLength": 3}, False),
        ("abc", {"type": "string", "pattern": "^a"}, True),
        ("xbc", {"type": "string", "pattern": "^a"}, False),
        (5, {"type": "integer", "minimum": 6}, False),
        (5, {"type": "integer", "exclusiveMaximum": 5}, False),
        (0.3, {"type": "number", "multipleOf": 0.1}, True),
        (7, {"type": "integer", "multipleOf": 2}, False),
        ([1, 2], {"type": "array", "items": {"type": "integer"}, "maxItems": 1}, False),
        (
            [1, "a"],
            {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
            True,
        ),
        ({"a": 1}, {"type": "object", "additionalProperties": False}, False),
        ({"a": 1}, {"type": "object", "additionalProperties": {"type": "string"}}, False),
        ({}, {"type": "object", "required": ["a"]}, False),
        (3, {"anyOf": [{"type": "string"}, {"type": "integer"}]}, True),
        (3, {"oneOf": [{"type": "number"}, {"type": "integer"}]}, False),
        (3, {"allOf": [{"type": "integer"}, {"minimum": 4}]}, False),
        ("x", {"$ref": "#/$defs/S", "$defs": {"S": {"type": "string"}}}, True),
        (3, {"$ref": "#/$defs/S", "$defs": {"S": {"type": "string"}}}, False),
        (3, {"$ref": "#/$defs/Missing"}, False),
        (3, {"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}, False),
        ("anything", True, True),
        ("anything", False, False),
    ],
)
def test_validate_json_value(value: Any, schema: Any, valid: bool) -> None:
    assert (validate_json_value(value, schema) == []) is valid


def test_validation_errors_have_pydantic_shape() -> None:
    errors = validate_json_value(
        {"a": [1, "x"]},
        {
            "type": "object",
            "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
        },
    )
    assert errors == [
        {"type": "integer_type", "loc": ("a", 1), "msg": "Input should be integer", "input": "x"}
    ]


# -- hypothesis --------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), _json_values.map(json.dumps)))
@pytest.mark.parametrize("schema", [Person, Tree, Optionals, HAND_WRITTEN])
def test_fuzzed_replies_give_only_structured_output_errors_or_valid_results(
    schema: Any, content: str
) -> None:
    failure: StructuredOutputError | None = None
    try:
        result = parse_structured(content, schema)
    except StructuredOutputError as exc:
        failure = exc
    if failure is not None:
        assert failure.content == content
        return
    if isinstance(schema, dict):
        assert validate_json_value(result, schema) == []
    else:
        assert isinstance(result, schema)


_leaf_schemas = st.sampled_from(
    [
        {"type": "string"},
        {"type": "integer", "minimum": -5, "maximum": 50},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "string", "enum": ["a", "b", "c"]},
        {"type": "string", "format": "date-time"},
        {"type": "string", "minLength": 3, "maxLength": 6},
        {"type": "integer", "multipleOf": 5, "minimum": 1},
        {"type": "null"},
        {"$ref": "#/$defs/Shared"},
    ]
)
_names = st.text(alphabet="abcdefghij", min_size=1, max_size=6)
_schemas = st.recursive(
    _leaf_schemas,
    lambda inner: (
        st.builds(
            lambda props, required_share: {
                "type": "object",
                "properties": props,
                "required": [k for i, k in enumerate(props) if i % 2 == required_share],
            },
            st.dictionaries(_names, inner, min_size=1, max_size=4),
            st.integers(0, 1),
        )
        | st.builds(
            lambda items, low: {"type": "array", "items": items, "minItems": low},
            inner,
            st.integers(0, 2),
        )
        | st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner)
    ),
    max_leaves=12,
)
_shared = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    properties=st.dictionaries(_names, _schemas, min_size=1, max_size=5),
    seed=st.integers(0, 2**32),
)
def test_strict_conversion_of_any_schema_is_accepted_and_generated_values_conform(
    properties: dict[str, Any], seed: int
) -> None:
    schema = {"type": "object", "properties": properties, "$defs": {"Shared": _shared}}
    strict = to_strict_json_schema(schema)
    assert strict_schema_errors(strict) == []
    value = value_from_schema(strict, random.Random(seed))
    assert validate_json_value(value, strict) == []
    # a value of the strict schema is also a value of the original (nulls aside)
    assert set(value) == set(properties)
    assert parse_structured(json.dumps(value), strict) == value


@settings(max_examples=50)
@given(seed=st.integers(0, 2**32))
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_values_generated_for_a_model_schema_validate_with_the_model(
    model: type[BaseModel], seed: int
) -> None:
    schema = to_strict_json_schema(model)
    value = value_from_schema(schema, random.Random(seed))
    assert validate_json_value(value, schema) == []
    assert isinstance(parse_structured(json.dumps(value), model), model)


def test_each_format_is_a_fresh_dict() -> None:
    first = structured_output_format("person", Person)
    first["json_schema"]["schema"]["properties"].clear()
    second = structured_output_format("person", Person)
    assert second["json_schema"]["schema"] == openai_to_strict_json_schema(Person)
