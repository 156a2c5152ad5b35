"""Tokenizer loading and incremental detokenization.

The detokenizer turns one token at a time into text that is final: with byte-level BPE a
character can span tokens, so text is released only once its bytes are complete (the tokenizers
library's DecodeStream does that for fast tokenizers; slow ones decode a growing window).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def load_tokenizer(path: str, mode: str = "auto"):
    from transformers import AutoTokenizer

    use_fast = mode != "slow"
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=use_fast)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path!r} (use --skip-tokenizer-init for token ids only): {e}") from e


class IncrementalDetokenizer:
    """Feeds output token ids in, returns only the newly final text each time."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        backend = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        # Prime with the prompt's tail so the first output token decodes in context (leading spaces),
        # cut back to a whole character: bytes of a character the prompt leaves open belong to the
        # prompt, and an output token that continues them decodes as U+FFFD, as a one-shot decode does.
        context = list(prompt_token_ids[-6:])
        while context and tokenizer.decode(context, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            context.pop()
        self.context = tuple(context)  # what the first output token is decoded after
        # What a one-shot decode of the same ids takes to give the same text (SampleState).
        self.decode_kwargs = {"skip_special_tokens": skip_special_tokens, "clean_up_tokenization_spaces": False}
        if backend is not None:
            from tokenizers.decoders import DecodeStream

            self._backend = backend
            self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        else:
            self.decode_kwargs["spaces_between_special_tokens"] = spaces_between_special_tokens
            self._ids: list[int] = context
            self._prefix_offset = 0
            self._read_offset = len(self._ids)

    def step(self, token_id: int) -> str:
        if self._stream is not None:
            return self._stream.step(self._backend, token_id) or ""
        return self._slow_step(token_id)

    def _slow_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        kw = {"skip_special_tokens": self.skip_special_tokens,
              "spaces_between_special_tokens": self.spaces_between_special_tokens}
        prefix = self.tokenizer.decode(self._ids[self._prefix_offset:self._read_offset], **kw)
        full = self.tokenizer.decode(self._ids[self._prefix_offset:], **kw)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix):]
        return ""
