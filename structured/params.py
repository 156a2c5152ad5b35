"""StructuredOutputsParams: the one constraint a request may put on its output.

Only validated here (types, exactly one kind). structured/spec.py normalizes it into the grammar
source that structured/compiler.py compiles with xgrammar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | dict | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        given = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, json_object, regex, choice, grammar, "
                f"structural_tag; got {given or 'none'}"
            )
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple)) or not self.choice
            or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")
        for name, types in (("json", (str, dict)), ("regex", str), ("grammar", str),
                            ("structural_tag", (str, dict)), ("whitespace_pattern", str)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, types):
                raise ValueError(f"structured_outputs.{name} must be {_names(types)}, got {type(value).__name__}")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object must be a bool, got {self.json_object!r}")

    def kind(self) -> tuple[str, Any]:
        for name in KINDS:
            value = getattr(self, name)
            if value not in (None, False):
                return name, value
        raise AssertionError("validated in __post_init__")


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("a JSON string" if t is str else "an object" for t in types) if len(types) > 1 else "a string"
