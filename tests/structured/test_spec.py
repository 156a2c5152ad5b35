"""Params validation and normalization into GrammarSpecs (the grammar cache key)."""

from __future__ import annotations

import json

import pytest

from structured import GrammarSpec, StructuredOutputsConfig, StructuredOutputsParams, to_spec
from structured.spec import choice_grammar, normalize_schema


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"),
    ({"regex": "a", "choice": ["a"]}, "exactly one of"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"choice": ["a", 1]}, "structured_outputs.choice"),
    ({"regex": 5}, "structured_outputs.regex"),
    ({"json": 3}, "structured_outputs.json"),
    ({"json_object": "yes"}, "exactly one of|structured_outputs.json_object"),
])
def test_params_reject_bad_fields_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_equivalent_schemas_give_equal_specs_and_keep_property_order():
    a = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}, "required": ["b"]}
    b = json.dumps({"required": ["b"], "properties": {"b": {"type": "integer"}, "a": {"type": "string"}},
                    "type": "object"}, indent=2)
    spec_a, spec_b = to_spec(StructuredOutputsParams(json=a)), to_spec(StructuredOutputsParams(json=b))
    assert spec_a == spec_b and hash(spec_a) == hash(spec_b)
    # xgrammar generates properties in the schema's order: that order is part of the grammar.
    assert list(json.loads(spec_a.source)["properties"]) == ["b", "a"]
    swapped = dict(a, properties={"a": {"type": "string"}, "b": {"type": "integer"}})
    assert to_spec(StructuredOutputsParams(json=swapped)) != spec_a


def test_whitespace_flags_come_from_request_or_config():
    params = StructuredOutputsParams(json={"type": "object"})
    assert to_spec(params).any_whitespace
    assert not to_spec(StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True)).any_whitespace
    assert not to_spec(params, StructuredOutputsConfig(disable_any_whitespace=True)).any_whitespace
    assert to_spec(params) != to_spec(params, StructuredOutputsConfig(disable_any_whitespace=True))


def test_disable_additional_properties_closes_every_object_schema_but_not_data():
    schema = {
        "type": "object",
        "properties": {"inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
                       "open": {"type": "object", "additionalProperties": True},
                       "list": {"type": "array", "items": {"properties": {"y": {"type": "string"}}}},
                       "either": {"anyOf": [{"type": "object"}, {"type": "string"}]},
                       "ref": {"$ref": "#/$defs/d"},
                       "data": {"enum": [{"type": "object"}], "default": {"type": "object"}}},
        "$defs": {"d": {"type": ["object", "null"]}},
    }
    out = normalize_schema(schema, disable_additional_properties=True)
    props = out["properties"]
    assert out["additionalProperties"] is False
    assert props["inner"]["additionalProperties"] is False
    assert props["open"]["additionalProperties"] is True  # set by the schema: kept
    assert props["list"]["items"]["additionalProperties"] is False
    assert props["either"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in props["either"]["anyOf"][1]
    assert out["$defs"]["d"]["additionalProperties"] is False
    assert props["data"]["enum"] == [{"type": "object"}] and props["data"]["default"] == {"type": "object"}
    assert "additionalProperties" not in normalize_schema(schema)  # off by default
    config_on = to_spec(StructuredOutputsParams(json=schema), StructuredOutputsConfig(disable_additional_properties=True))
    request_on = to_spec(StructuredOutputsParams(json=schema, disable_additional_properties=True))
    assert config_on == request_on != to_spec(StructuredOutputsParams(json=schema))


def test_a_property_named_like_a_keyword_is_a_name_not_a_keyword():
    schema = {"type": "object", "properties": {"properties": {"type": "object",
                                                               "properties": {"z": {}, "a": {}}}}}
    out = normalize_schema(schema, disable_additional_properties=True)
    assert list(out["properties"]["properties"]["properties"]) == ["z", "a"]
    assert out["properties"]["properties"]["additionalProperties"] is False


def test_length_bounded_strings_become_patterns():
    # xgrammar 0.2.8 lets raw control characters into length-bounded strings (mlc-ai/xgrammar#800).
    assert normalize_schema({"type": "string", "minLength": 2, "maxLength": 5}) == \
        {"pattern": "^[\\s\\S]{2,5}$", "type": "string"}
    assert normalize_schema({"type": "string", "maxLength": 5})["pattern"] == "^[\\s\\S]{0,5}$"
    assert normalize_schema({"type": "string", "minLength": 1})["pattern"] == "^[\\s\\S]{1,}$"
    with_pattern = {"type": "string", "maxLength": 5, "pattern": "a+"}
    assert normalize_schema(with_pattern) == with_pattern


def test_json_object_is_an_object_schema_and_ignores_closing():
    spec = to_spec(StructuredOutputsParams(json_object=True, disable_additional_properties=True))
    assert spec == GrammarSpec("json", '{"type":"object"}') and spec.field == "json_object"


def test_choice_becomes_an_escaped_ebnf_alternation():
    assert choice_grammar(["yes", "no", "yes"]) == 'root ::= "yes" | "no"'
    assert choice_grammar(['a"b', "c\\d", "e\nf", "🚀"]) == 'root ::= "a\\"b" | "c\\\\d" | "e\\nf" | "🚀"'
    spec = to_spec(StructuredOutputsParams(choice=["x", "y"]))
    assert (spec.kind, spec.field) == ("grammar", "choice")


def test_grammar_without_a_bnf_rule_is_read_as_lark():
    assert to_spec(StructuredOutputsParams(grammar='root ::= "a"')).kind == "grammar"
    assert to_spec(StructuredOutputsParams(grammar='start: "a"')).kind == "lark"


def test_legacy_structural_tag_is_upgraded():
    legacy = {"type": "structural_tag", "triggers": ["<f="],
              "structures": [{"begin": "<f=x>", "schema": {"type": "object"}, "end": "</f>"}]}
    spec = to_spec(StructuredOutputsParams(structural_tag=json.dumps(legacy)))
    fmt = json.loads(spec.source)["format"]
    assert fmt["type"] == "triggered_tags" and fmt["triggers"] == ["<f="]
    assert fmt["tags"] == [{"type": "tag", "begin": "<f=x>", "end": "</f>",
                            "content": {"type": "json_schema", "json_schema": {"type": "object"}}}]
    with pytest.raises(ValueError, match="structured_outputs.structural_tag: legacy"):
        to_spec(StructuredOutputsParams(structural_tag={"structures": [{"begin": "<f>"}], "triggers": []}))


@pytest.mark.parametrize("params, message", [
    (StructuredOutputsParams(json="{not json"), "structured_outputs.json: not valid JSON"),
    (StructuredOutputsParams(json="[1, 2]"), "structured_outputs.json must be a JSON schema object"),
    (StructuredOutputsParams(structural_tag="nope"), "structured_outputs.structural_tag: not valid JSON"),
    (StructuredOutputsParams(regex="a", whitespace_pattern=r"\s*"), "whitespace_pattern is not supported"),
])
def test_malformed_specs_fail_before_compiling(params, message):
    with pytest.raises(ValueError, match=message):
        to_spec(params)
