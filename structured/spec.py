"""GrammarSpec: a request's constraint normalized into the exact source xgrammar compiles.

The spec is also the grammar cache key, so two requests that mean the same grammar must produce
equal specs: JSON schemas are re-serialized with sorted keywords (except the order of
`properties`, which xgrammar follows when it generates objects, so it is kept), choices become an
EBNF alternation, `json_object` becomes the schema {"type": "object"}. Everything here is pure
Python and cheap; it runs on the event loop and raises ValueError naming the field, before any
compile is queued.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .config import StructuredOutputsConfig
from .params import StructuredOutputsParams

# Keywords whose value is one subschema, a list of subschemas, or a name -> subschema map.
_SCHEMA_KEYWORDS = {"items", "additionalProperties", "additionalItems", "contains", "not", "if",
                    "then", "else", "propertyNames", "unevaluatedProperties", "unevaluatedItems"}
_SCHEMA_LIST_KEYWORDS = {"allOf", "anyOf", "oneOf", "prefixItems", "items"}
_SCHEMA_MAP_KEYWORDS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_OBJECT_SCHEMA = {"type": "object"}
# A calendar date, exactly: xgrammar's "date" format is \d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01]), which
# lets 2023-02-30, 1811-11-31 and year 0000 through (jsonschema's date check, Python's, refuses them).
_YEAR = r"([1-9]\d{3}|0[1-9]\d{2}|00[1-9]\d|000[1-9])"
_LEAP_YEAR = r"(\d\d(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE_PATTERN = (rf"^({_YEAR}-((0[13578]|1[02])-(0[1-9]|[12]\d|3[01])|(0[469]|11)-(0[1-9]|[12]\d|30)"
                 rf"|02-(0[1-9]|1\d|2[0-8]))|{_LEAP_YEAR}-02-29)$")


@dataclass(frozen=True)
class GrammarSpec:
    """What to compile: kind is json, regex, grammar (EBNF), lark or structural_tag."""

    kind: str
    source: str
    any_whitespace: bool = True  # only json reads it; the other kinds keep the default
    # The StructuredOutputsParams field it came from, for error messages (not part of the key).
    field: str = field(default="", compare=False)


def to_spec(params: StructuredOutputsParams, config: StructuredOutputsConfig | None = None) -> GrammarSpec:
    """Normalize a request's params (with the engine's defaults) into its GrammarSpec."""
    config = config or StructuredOutputsConfig()
    if params.whitespace_pattern is not None:
        # xgrammar has no whitespace regex; silently ignoring it would change the output format.
        raise ValueError("structured_outputs.whitespace_pattern is not supported by the xgrammar "
                         "backend; use disable_any_whitespace instead")
    any_whitespace = not (params.disable_any_whitespace or config.disable_any_whitespace)
    name, value = params.kind()
    if name == "json":
        schema = _load_json(value, "json")
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
        inject = params.disable_additional_properties or config.disable_additional_properties
        return GrammarSpec("json", _dumps(normalize_schema(schema, inject)), any_whitespace, "json")
    if name == "json_object":
        # Not xgrammar's builtin JSON grammar: that one also allows a top-level array.
        return GrammarSpec("json", _dumps(_OBJECT_SCHEMA), any_whitespace, "json_object")
    if name == "regex":
        return GrammarSpec("regex", value, field="regex")
    if name == "choice":
        return GrammarSpec("grammar", choice_grammar(value), field="choice")
    if name == "grammar":
        # vLLM's rule: an EBNF/GBNF grammar has a `::=` rule; without one, read it as Lark.
        return GrammarSpec("grammar" if "::=" in value else "lark", value, field="grammar")
    tag = _load_json(value, "structural_tag")
    if not isinstance(tag, dict):
        raise ValueError("structured_outputs.structural_tag must be a JSON object")
    return GrammarSpec("structural_tag", _dumps(_upgrade_structural_tag(tag)), field="structural_tag")


def normalize_schema(schema, disable_additional_properties: bool = False):
    """Sort a schema's keywords (not its `properties`); optionally close every object schema.

    Closing means `"additionalProperties": false` on each object schema that does not set it
    (vLLM's disable_additional_properties). Values that are data, not schemas (enum, const,
    default, examples, ...), are copied untouched.
    """
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key in sorted(schema):
        value = schema[key]
        if key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            items = value.items() if key == "properties" else sorted(value.items())
            out[key] = {name: normalize_schema(sub, disable_additional_properties) for name, sub in items}
        elif key in _SCHEMA_LIST_KEYWORDS and isinstance(value, list):
            out[key] = [normalize_schema(sub, disable_additional_properties) for sub in value]
        elif key in _SCHEMA_KEYWORDS:
            out[key] = normalize_schema(value, disable_additional_properties)
        else:
            out[key] = value
    if disable_additional_properties and _is_object_schema(schema) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return _length_as_pattern(_date_as_pattern(out))


def _date_as_pattern(schema: dict) -> dict:
    """Say `"format": "date"` as an exact pattern (xgrammar 0.2.8's allows days a month lacks)."""
    if schema.get("type") != "string" or schema.get("format") != "date" or "pattern" in schema:
        return schema
    out = {k: v for k, v in schema.items() if k != "format"}
    out["pattern"] = _DATE_PATTERN
    return dict(sorted(out.items()))


def _length_as_pattern(schema: dict) -> dict:
    """Say a string's minLength/maxLength as a pattern (xgrammar 0.2.8 workaround).

    xgrammar lowers a length-bounded string to `[^"\\\r\n]{min,max}`, which lets raw control
    characters through (invalid JSON: mlc-ai/xgrammar#800); its pattern path does not. A schema with
    a pattern or a format is left as it is (xgrammar ignores lengths next to a pattern anyway).
    """
    if (schema.get("type") != "string" or "pattern" in schema or "format" in schema
            or not ("minLength" in schema or "maxLength" in schema)):
        return schema
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if not isinstance(low, int) or not isinstance(high, (int, type(None))):
        return schema  # malformed: leave it to xgrammar to reject
    high = "" if high is None else high
    out = {k: v for k, v in schema.items() if k not in ("minLength", "maxLength")}
    out["pattern"] = f"^[\\s\\S]{{{low},{high}}}$"
    return dict(sorted(out.items()))


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly the given strings."""
    # JSON string escapes are valid EBNF string literals in xgrammar (checked in the tests).
    alternatives = dict.fromkeys(json.dumps(c, ensure_ascii=False) for c in choices)
    return "root ::= " + " | ".join(alternatives)


def _is_object_schema(schema: dict) -> bool:
    kind = schema.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema


def _upgrade_structural_tag(tag: dict) -> dict:
    """Turn vLLM's legacy {"structures": [{begin, schema, end}], "triggers"} into xgrammar's format."""
    if "format" in tag or "structures" not in tag:
        return tag
    try:
        tags = [{"type": "tag", "begin": s["begin"], "end": s["end"],
                 "content": {"type": "json_schema", "json_schema": s["schema"]}} for s in tag["structures"]]
        triggers = list(tag["triggers"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"structured_outputs.structural_tag: legacy structures need begin, schema, end "
                         f"and a triggers list ({e!r})") from None
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": triggers, "tags": tags}}


def _load_json(value, name: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"structured_outputs.{name}: not valid JSON: {e}") from None


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
