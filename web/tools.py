"""Tool calling: validating `tools`/`tool_choice`, the JSON schemas that enforce required and named
choices, and the parsers that turn model text into OpenAI `tool_calls` (whole or streamed).

Parsers are small state machines fed text deltas (`feed`) and flushed at the end (`finish`), each
step returning (content delta, tool-call deltas). Tool-call deltas have OpenAI's streaming shape:
the first one of a call carries index, id, type and the function name with empty arguments; later
ones carry argument text. `merge_tool_call_deltas` folds them into whole calls, which is how the
non-streaming response is built, so both paths give the same calls.

- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks anywhere in the text.
- llama3_json: the whole output is `{"name": ..., "parameters": {...}}` objects separated by `;`,
  optionally after `<|python_tag|>`; an output that starts otherwise is plain content.
- named / required choices: the output is the arguments object / a JSON list of {name, parameters}.
"""

from __future__ import annotations

import json
import re
import uuid

import orjson

from .errors import RequestError
from .reasoning import _partial_suffix

_DECODER = json.JSONDecoder()
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_SEPARATORS = re.compile(r"[\s,]*")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --- request side ---

def check_tools(body: dict) -> tuple[list[dict] | None, str | dict]:
    """(tools, tool_choice) with OpenAI's defaults: 'auto' when tools are given, else 'none'."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise RequestError("'tools' must be a list of {'type': 'function', 'function': {'name': ...}}", param="tools")
        for t in tools:
            params = t["function"].get("parameters")
            if params is not None and not isinstance(params, dict):
                raise RequestError(f"tool {t['function']['name']!r}: 'parameters' must be a JSON schema object",
                                   param="tools")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise RequestError("'tool_choice' must be none, auto, required or {'type': 'function', 'function': "
                               "{'name': ...}}", param="tool_choice")
        if not any(t["function"]["name"] == name for t in tools or []):
            raise RequestError(f"'tool_choice' names {name!r}, which is not in 'tools'", param="tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise RequestError("'tool_choice' must be none, auto, required or a named function", param="tool_choice")
    elif choice == "required" and not tools:
        raise RequestError("'tool_choice': 'required' needs 'tools'", param="tool_choice")
    return tools, choice


def _parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def tool_choice_schema(tools: list[dict], choice: str | dict) -> dict | None:
    """The JSON schema that makes the output a valid call for required / named choices."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return _parameters(next(t for t in tools if t["function"]["name"] == name))
    if choice == "required":
        return {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": [
            {"properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "parameters": _parameters(t)},
             "required": ["name", "parameters"]} for t in tools]}}
    return None


# --- response side ---

def merge_tool_call_deltas(deltas: list[dict]) -> list[dict]:
    """Whole tool calls from streamed tool-call deltas (by index)."""
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call["id"] = d.get("id") or call["id"]
        fn = d.get("function") or {}
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


def _header(index: int, name: str) -> dict:
    return {"index": index, "id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}


def _args(index: int, text: str) -> dict:
    return {"index": index, "function": {"arguments": text}}


def _dumps(value) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


class JsonCallStreamer:
    """One `{"name": ..., "arguments"|"parameters": {...}}` object as it grows, as call deltas.

    The name goes out as soon as it is complete; argument text streams as written, cut exactly where
    the arguments object ends, so the concatenated arguments are the model's own JSON text.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.name_end = -1
        self.args_start = -1  # -2: arguments not streamable (not an object, or before the name)
        self.args_sent = ""

    @property
    def started(self) -> bool:
        return self.name_end >= 0

    def update(self, buf: str) -> list[dict]:
        out: list[dict] = []
        if self.name_end < 0:
            m = _NAME.match(buf)
            if m is None:
                return out
            self.name_end = m.end()
            out.append(_header(self.index, json.loads(f'"{m.group(1)}"')))
        if self.args_start == -1:
            m = _ARGS.match(buf, self.name_end)
            if m is None or m.end() >= len(buf):
                return out
            self.args_start = m.end() if buf[m.end()] == "{" else -2
        if self.args_start < 0:
            return out
        try:
            _, end = _DECODER.raw_decode(buf, self.args_start)
            avail = buf[self.args_start:end]
        except json.JSONDecodeError:
            avail = buf[self.args_start:]
        if len(avail) > len(self.args_sent):
            out.append(_args(self.index, avail[len(self.args_sent):]))
            self.args_sent = avail
        return out

    def close(self, buf: str) -> list[dict] | None:
        """The remaining deltas of a finished object; None if it is not a call (nothing sent yet)."""
        try:
            obj = json.loads(buf)
        except json.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None if not self.started else []
        out = self.update(buf)
        if not self.started:  # e.g. arguments came before the name
            out.append(_header(self.index, obj["name"]))
            self.name_end = len(buf)
        if self.args_start < 0 and not self.args_sent:
            args = obj.get("arguments", obj.get("parameters", {}))
            out.append(_args(self.index, _dumps(args)))
        return out


class ToolParser:
    """Base: feed(text) / finish() -> (content delta, tool-call deltas); parse(text) for whole outputs."""

    calls_finish_reason = "tool_calls"  # the finish_reason of a choice that called tools

    def __init__(self) -> None:
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[dict]]:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, whole tool calls) of a complete output."""
        c1, d1 = self.feed(text)
        c2, d2 = self.finish()
        return (c1 + c2) or None, merge_tool_call_deltas(d1 + d2)


class HermesToolParser(ToolParser):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""  # text not yet emitted (outside a block) or the current block's body
        self.call: JsonCallStreamer | None = None

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        content, deltas = "", []
        while True:
            if self.call is None:
                idx = self.buf.find(self.OPEN)
                if idx == -1:  # hold back what may start a tag, and trailing whitespace (it may precede one)
                    cut = len(self.buf) - _partial_suffix(self.buf, self.OPEN)
                    cut = len(self.buf[:cut].rstrip())
                    content, self.buf = content + self.buf[:cut], self.buf[cut:]
                    return content, deltas
                content += self.buf[:idx].rstrip()
                self.buf = self.buf[idx + len(self.OPEN):]
                self.call = JsonCallStreamer(self.num_calls)
            idx = self.buf.find(self.CLOSE)
            if idx == -1:
                deltas += self.call.update(self.buf)
                return content, deltas
            block, self.buf = self.buf[:idx], self.buf[idx + len(self.CLOSE):]
            content, deltas = self._close_block(block, content, deltas, closed=True)

    def _close_block(self, block: str, content: str, deltas: list[dict], closed: bool) -> tuple[str, list[dict]]:
        rest = self.call.close(block)
        if rest is None:  # not a call after all: it was text
            content += self.OPEN + block + (self.CLOSE if closed else "")
        else:
            deltas += rest
            self.num_calls += 1
        self.call = None
        return content, deltas

    def finish(self) -> tuple[str, list[dict]]:
        if self.call is not None:  # output ended inside a block (length, or eos before the close tag)
            content, deltas = self._close_block(self.buf, "", [], closed=False)
        else:
            content, deltas = (self.buf if self.buf.strip() or not self.num_calls else ""), []
        self.buf = ""
        return content, deltas


class Llama3JsonToolParser(ToolParser):
    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.mode = "start"  # start -> calls | content
        self.buf = ""
        self.call: JsonCallStreamer | None = None

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        if self.mode == "start":
            head = self.buf.lstrip()
            if head.startswith(self.TAG):
                self.buf, self.mode = head[len(self.TAG):], "calls"
            elif head.startswith("{"):
                self.buf, self.mode = head, "calls"
            elif not head or self.TAG.startswith(head):
                return "", []
            else:
                self.mode = "content"
        if self.mode == "content":
            out, self.buf = self.buf, ""
            return out, []
        return self._calls()

    def _calls(self) -> tuple[str, list[dict]]:
        deltas: list[dict] = []
        while True:
            self.buf = self.buf.lstrip().lstrip(";").lstrip()
            if not self.buf:
                return "", deltas
            if self.call is None:
                self.call = JsonCallStreamer(self.num_calls)
            try:
                _, end = _DECODER.raw_decode(self.buf)
            except json.JSONDecodeError:
                deltas += self.call.update(self.buf)
                return "", deltas
            rest = self.call.close(self.buf[:end])
            if rest is None:  # a JSON value that is not a call: keep it as text
                self.mode = "content"
                out, self.buf, self.call = self.buf, "", None
                return out, deltas
            deltas += rest
            self.num_calls += 1
            self.call, self.buf = None, self.buf[end:]

    def finish(self) -> tuple[str, list[dict]]:
        if self.mode == "calls" and self.call is not None and self.buf:  # truncated object
            rest = self.call.close(self.buf)
            buf, self.buf = self.buf, ""
            return ("" if rest is not None else buf), rest or []
        out, self.buf = (self.buf if self.mode != "calls" else ""), ""
        return out, []


class NamedToolParser(ToolParser):
    """tool_choice naming one function: the whole output is its arguments."""

    calls_finish_reason = "stop"  # as OpenAI does for a forced function

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def feed(self, text: str) -> tuple[str, list[dict]]:
        deltas = []
        if not self.num_calls:
            deltas.append(_header(0, self.name))
            self.num_calls = 1
        if text:
            deltas.append(_args(0, text))
        return "", deltas

    def finish(self) -> tuple[str, list[dict]]:
        return self.feed("")


class RequiredToolParser(ToolParser):
    """tool_choice 'required': a JSON list of {name, parameters}; each call goes out once complete."""

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""
        self.pos = -1  # where the next list item starts (-1: before the '[')
        self.broken = False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        deltas: list[dict] = []
        if self.pos < 0:
            start = self.buf.find("[")
            if start == -1:
                return "", deltas
            self.pos = start + 1
        while not self.broken:
            m = _SEPARATORS.match(self.buf, self.pos)
            self.pos = m.end()
            if self.pos >= len(self.buf) or self.buf[self.pos] == "]":
                break
            try:
                item, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError:
                break
            self.pos = end
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                self.broken = True
                break
            deltas.append(_header(self.num_calls, item["name"]))
            deltas.append(_args(self.num_calls, _dumps(item.get("parameters", item.get("arguments", {})))))
            self.num_calls += 1
        return "", deltas

    def finish(self) -> tuple[str, list[dict]]:
        # Without the grammar the output may not be a list of calls: then it is content.
        content = self.buf if not self.num_calls else ""
        self.buf = ""
        return content, []


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def make_tool_parser(tool_choice: str | dict, auto_parser: str | None) -> ToolParser | None:
    """The parser for a request, or None when its output is plain content."""
    if isinstance(tool_choice, dict):
        return NamedToolParser(tool_choice["function"]["name"])
    if tool_choice == "required":
        return RequiredToolParser()
    if tool_choice == "auto" and auto_parser:
        return TOOL_PARSERS[auto_parser]()
    return None
