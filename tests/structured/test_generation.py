"""End to end on the CPU: a fake random model decodes through compiled grammars, bitmasks and
matchers, and every output parses and validates."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from structured import StructuredOutputsParams

from .conftest import PADDED_VOCAB

SEEDS = [0, 1, 2]

POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
         "required": ["x", "y"]}
SCHEMAS = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"]},
    "nested": {"type": "object", "required": ["user"], "properties": {"user": {
        "type": "object", "required": ["id", "profile"], "properties": {
            "id": {"type": "integer"},
            "profile": {"type": "object", "required": ["verified"],
                        "properties": {"verified": {"type": "boolean"}, "nick": {"type": "string"}}}}}}},
    "int_array_bounds": {"type": "object", "required": ["values"], "properties": {
        "values": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}}},
    "object_array": {"type": "array", "minItems": 1, "maxItems": 3, "items": POINT},
    "enum_strings": {"type": "object", "required": ["color"],
                     "properties": {"color": {"enum": ["red", "green", "blue"]}}},
    "enum_mixed": {"type": "object", "required": ["v"], "properties": {"v": {"enum": [1, "two", None, True]}}},
    "int_range": {"type": "object", "required": ["a", "b"], "properties": {
        "a": {"type": "integer", "minimum": -5, "maximum": 5},
        "b": {"type": "integer", "exclusiveMinimum": 10, "maximum": 1000}}},
    "number_range": {"type": "object", "required": ["p"], "properties": {
        "p": {"type": "number", "minimum": 0, "maximum": 1}}},
    "string_patterns": {"type": "object", "required": ["zip", "code"], "properties": {
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}},
    "string_lengths": {"type": "object", "required": ["short", "long"], "properties": {
        "short": {"type": "string", "maxLength": 4}, "long": {"type": "string", "minLength": 3, "maxLength": 12}}},
    "any_of_scalars": {"type": "object", "required": ["v"],
                       "properties": {"v": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]}}},
    "any_of_objects": {"type": "object", "required": ["shape"], "properties": {"shape": {"anyOf": [
        {"type": "object", "required": ["kind", "r"], "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}},
        {"type": "object", "required": ["kind", "w", "h"], "properties": {
            "kind": {"const": "rect"}, "w": {"type": "integer"}, "h": {"type": "integer"}}}]}}},
    "refs": {"$defs": {"point": POINT}, "type": "object", "required": ["a", "b"],
             "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}}},
    "recursive_ref": {"$defs": {"node": {"type": "object", "required": ["value", "children"], "properties": {
        "value": {"type": "integer"},
        "children": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"},
    "optional_properties": {"type": "object", "required": ["id"], "properties": {
        "id": {"type": "integer"}, "note": {"type": "string"}, "score": {"type": "number"},
        "flag": {"type": "boolean"}}},
    "closed_objects": {"type": "object", "additionalProperties": False, "required": ["inner"], "properties": {
        "inner": {"type": "object", "additionalProperties": False, "properties": {"k": {"type": "string"}}}}},
    "string_map": {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    "tuple": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
              "items": False, "minItems": 3},
    "nullable_and_const": {"type": "object", "required": ["t", "n", "c"], "properties": {
        "t": {"type": ["string", "null"]}, "n": {"type": "null"}, "c": {"const": "fixed"}}},
    "formats": {"type": "object", "required": ["day", "id"], "properties": {
        "day": {"type": "string", "format": "date"}, "id": {"type": "string", "format": "uuid"}}},
}
assert len(SCHEMAS) == 20


def _validate(schema: dict, text: str) -> None:
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(value)


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schemas_validate_in_a_batch_mixed_with_unconstrained_rows(service, generate, seed):
    names = list(SCHEMAS)
    compact = seed == 2  # one seed without free whitespace between tokens
    grammars = [service.compile_sync(StructuredOutputsParams(json=SCHEMAS[n], disable_any_whitespace=compact))
                for n in names]
    # Unconstrained rows in between: the bitmask must leave them alone (checked every step).
    batch = [None, *grammars[:7], None, *grammars[7:14], None, None, *grammars[14:]]
    out = generate(batch, seed=seed)
    for name, text, done in zip(names, out.texts, out.terminated):
        assert done, f"{name}: no stop token within the step limit: {text!r}"
        _validate(SCHEMAS[name], text)
        if compact:  # whitespace only in strings and in xgrammar's separators ", " and ": "
            outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text).replace(", ", ",").replace(": ", ":")
            assert not re.search(r"\s", outside), f"{name}: {text!r}"


@pytest.mark.parametrize("seed", SEEDS)
def test_padding_ids_never_allowed_with_a_wider_lm_head(padded_service, generate, seed):
    # The fake model pushes the padding ids (4096..4159) hardest; generate() also checks the masks.
    schema = SCHEMAS["nested"]
    compiled = padded_service.compile_sync(StructuredOutputsParams(json=schema))
    json_object = padded_service.compile_sync(StructuredOutputsParams(json_object=True))
    out = generate([compiled, json_object, None], vocab_size=PADDED_VOCAB, seed=seed)
    assert all(out.terminated)
    assert all(t < 4096 for ids in out.token_ids for t in ids)
    _validate(schema, out.texts[0])
    assert isinstance(json.loads(out.texts[1]), dict)


REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(cat|dog|bird)s?", r"[a-z]{1,8}@[a-z]{2,6}\.(com|org)",
           r"\d{4}-\d{2}-\d{2}", r"(true|false)", r"[A-Z][a-z]{2,5}( [A-Z][a-z]{2,5}){0,2}",
           r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,2})?", r"(héllo|世界|🚀)+"]


@pytest.mark.parametrize("seed", SEEDS)
def test_regex_outputs_fullmatch(service, generate, seed):
    out = generate([service.compile_sync(StructuredOutputsParams(regex=r)) for r in REGEXES], seed=seed)
    for regex, text, done in zip(REGEXES, out.texts, out.terminated):
        assert done and re.fullmatch(regex, text), (regex, text)


CHOICES = [["yes", "no", "maybe"], ["a", "ab", "abc"],
           ['say "hi"', "back\\slash", "new\nline", "世界 🚀", "tab\there"]]


@pytest.mark.parametrize("seed", SEEDS)
def test_choice_returns_exactly_one_choice(service, generate, seed):
    out = generate([service.compile_sync(StructuredOutputsParams(choice=c)) for c in CHOICES], seed=seed)
    for choices, text, done in zip(CHOICES, out.texts, out.terminated):
        assert done and text in choices, (choices, text)


ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")" | "-" factor
number ::= [0-9]+ ("." [0-9]+)?
"""


def parse_arithmetic(text: str) -> None:
    """A recursive-descent parser of ARITHMETIC's language; raises ValueError where text leaves it."""
    pos = 0

    def peek() -> str:
        return text[pos] if pos < len(text) else ""

    def number() -> None:
        nonlocal pos
        start = pos
        while peek().isdigit():
            pos += 1
        if pos == start:
            raise ValueError(f"digit expected at {pos}")
        if peek() == ".":
            pos += 1
            if not peek().isdigit():
                raise ValueError(f"digit expected after '.' at {pos}")
            while peek().isdigit():
                pos += 1

    def factor() -> None:
        nonlocal pos
        if peek() == "(":
            pos += 1
            expr()
            if peek() != ")":
                raise ValueError(f"')' expected at {pos}")
            pos += 1
        elif peek() == "-":
            pos += 1
            factor()
        else:
            number()

    def term() -> None:
        nonlocal pos
        factor()
        while peek() in ("*", "/") and peek():
            pos += 1
            factor()

    def expr() -> None:
        nonlocal pos
        term()
        while peek() in ("+", "-") and peek():
            pos += 1
            term()

    expr()
    if pos != len(text):
        raise ValueError(f"trailing text at {pos}: {text[pos:]!r}")


def test_reference_arithmetic_parser_rejects_what_it_should():
    for good in ["1", "1+2*3", "(1-2)/-3.5", "((4))"]:
        parse_arithmetic(good)
    for bad in ["", "1+", "(1", "1)", "1.", "a", "1 + 2"]:
        with pytest.raises(ValueError):
            parse_arithmetic(bad)


@pytest.mark.parametrize("seed", SEEDS)
def test_ebnf_arithmetic_outputs_parse(service, generate, seed):
    compiled = service.compile_sync(StructuredOutputsParams(grammar=ARITHMETIC))
    out = generate([compiled] * 4, seed=seed)
    for text, done in zip(out.texts, out.terminated):
        assert done, text
        parse_arithmetic(text)


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_yields_an_object(service, generate, seed):
    compiled = service.compile_sync(StructuredOutputsParams(json_object=True))
    out = generate([compiled] * 4, seed=seed)
    for text, done in zip(out.texts, out.terminated):
        assert done and isinstance(json.loads(text), dict), text


def test_structural_tag_wraps_a_schema(service, generate):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": "<tool>",
                                                 "content": {"type": "json_schema", "json_schema": schema},
                                                 "end": "</tool>"}}
    compiled = service.compile_sync(StructuredOutputsParams(structural_tag=json.dumps(tag)))
    out = generate([compiled] * 3, seed=0)
    for text, done in zip(out.texts, out.terminated):
        assert done and text.startswith("<tool>") and text.endswith("</tool>"), text
        _validate(schema, text[len("<tool>"):-len("</tool>")])
