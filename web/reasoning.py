"""Reasoning parsers: split a model's `<think>...</think>` text from its answer.

- qwen3: reasoning only when the output starts with `<think>` (thinking can be switched off in
  the template, and then the answer comes straight away).
- deepseek_r1: the template opens `<think>` in the prompt, so the output starts inside the
  reasoning; a leading `<think>` is dropped all the same.

Both are one small state machine fed text deltas (`feed`) and flushed at the end (`finish`); the
non-streaming `parse` runs the same machine over the whole text, so both paths agree.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningStream:
    """Feed text deltas, get (reasoning delta, content delta) pairs."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self.starts_in_reasoning = starts_in_reasoning
        self.state = "start"  # start -> reasoning -> content (or start -> content)
        self.held = ""

    def feed(self, text: str) -> tuple[str, str]:
        buf = self.held + text
        self.held = ""
        reasoning = content = ""
        if self.state == "start":
            stripped = buf.lstrip()
            if stripped.startswith(START):
                buf, self.state = stripped[len(START):], "reasoning"
            elif START.startswith(stripped):  # blank, or a piece of <think> so far
                self.held = buf
                return "", ""
            else:
                self.state = "reasoning" if self.starts_in_reasoning else "content"
        if self.state == "reasoning":
            idx = buf.find(END)
            if idx == -1:
                keep = _partial_suffix(buf, END)
                reasoning, self.held = buf[:len(buf) - keep], buf[len(buf) - keep:]
                return reasoning, ""
            reasoning, buf, self.state = buf[:idx], buf[idx + len(END):], "content"
        return reasoning, content + buf

    def finish(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.state == "reasoning" or (self.state == "start" and self.starts_in_reasoning):
            return held, ""
        return "", held

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole output; None where empty."""
        r1, c1 = self.feed(text)
        r2, c2 = self.finish()
        return (r1 + r2) or None, (c1 + c2) or None


REASONING_PARSERS = {
    "qwen3": lambda: ReasoningStream(starts_in_reasoning=False),
    "deepseek_r1": lambda: ReasoningStream(starts_in_reasoning=True),
}


def make_reasoning_parser(name: str) -> ReasoningStream:
    return REASONING_PARSERS[name]()
