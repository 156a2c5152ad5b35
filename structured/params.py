"""StructuredOutputsParams: the one constraint a request may put on its output.

Issue 5 compiles these with xgrammar and applies the bitmask; here they are only validated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, json_object, regex, choice, grammar, "
                f"structural_tag; got {given or 'none'}"
            )
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of strings, got {self.choice!r}")

    def kind(self) -> tuple[str, Any]:
        for name in ("json", "json_object", "regex", "choice", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value not in (None, False):
                return name, value
        raise AssertionError("validated in __post_init__")
