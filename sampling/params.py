"""SamplingParams: what a request asks of decoding, validated once at the boundary.

Names and meanings follow vLLM's SamplingParams so users of vLLM and the OpenAI API know them.
Invalid values raise ValueError naming the field; web/ turns that into a 400.
"""

from __future__ import annotations

import copy
import enum
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_GREEDY_EPS = 1e-5
# What the batched sampler reads per row, packed once per SamplingParams (sampling/metadata.py):
# float32 columns, then an int32 word of the features the row uses.
SAMPLER_COLUMNS = ("inv_temp", "top_k", "top_p", "floor_offset", "presence", "frequency", "repetition", "logprobs")
RANDOM, TOP_K, TOP_P, MIN_P, PENALTIES, REPETITION, BIAS, ALLOWED, LOGPROBS = (1 << i for i in range(9))


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0  # each yield holds everything generated so far
    DELTA = 1  # each yield holds only what is new since the last
    FINAL_ONLY = 2  # one yield, at the end


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: Any = None  # structured.StructuredOutputsParams
    extra_args: dict[str, Any] | None = None
    # Filled by the engine from the tokenizer / generation config, not by users.
    _eos_token_ids: tuple[int, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            # OpenAI clamps biases to [-100, 100] and sends token ids as strings.
            self.logit_bias = {int(k): max(-100.0, min(100.0, float(v))) for k, v in self.logit_bias.items()}
        if self.top_k is None:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, allowed: str, value: Any) -> None:
            raise ValueError(f"{name} must be {allowed}, got {value!r}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "an integer >= 1", self.n)
        if self.temperature < 0:
            fail("temperature", ">= 0", self.temperature)
        if not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]", self.top_p)
        if self.top_k < -1:
            fail("top_k", "-1, 0 (off) or a positive integer", self.top_k)
        if not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]", self.min_p)
        if not -2 <= self.presence_penalty <= 2:
            fail("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2 <= self.frequency_penalty <= 2:
            fail("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "> 0", self.repetition_penalty)
        if self.max_tokens is not None and self.max_tokens < 1:
            fail("max_tokens", "an integer >= 1", self.max_tokens)
        if self.min_tokens < 0:
            fail("min_tokens", ">= 0", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        if self.logprobs is not None and self.logprobs < -1:
            fail("logprobs", ">= 0 (or -1 for the whole vocabulary)", self.logprobs)
        if self.prompt_logprobs is not None and self.prompt_logprobs < -1:
            fail("prompt_logprobs", ">= 0 (or -1 for the whole vocabulary)", self.prompt_logprobs)
        if any(not s for s in self.stop):
            fail("stop", "a list of non-empty strings", self.stop)
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            fail("allowed_token_ids", "a non-empty list", self.allowed_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @functools.cached_property
    def sampler_row(self) -> bytes:
        """SAMPLER_COLUMNS as float32 bytes: 1/T (0 greedy), top_k, top_p, T*log(min_p) (-inf: off;
        a random row keeps logits >= its max + this), the penalties, logprobs (-2: none); then the
        feature flags as an int32. Computed on first use: params do not change once a request is in."""
        random = not self.greedy
        floor_offset = self.temperature * math.log(self.min_p) if self.min_p > 0 and random else -math.inf
        row = (1.0 / self.temperature if random else 0.0, self.top_k, self.top_p, floor_offset, self.presence_penalty,
               self.frequency_penalty, self.repetition_penalty, -2 if self.logprobs is None else self.logprobs)
        flags = ((RANDOM if random else 0) | (TOP_K if random and self.top_k > 0 else 0)
                 | (TOP_P if random and self.top_p < 1 else 0) | (MIN_P if random and self.min_p > 0 else 0)
                 | (PENALTIES if self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1 else 0)
                 | (REPETITION if self.repetition_penalty != 1 else 0) | (BIAS if self.logit_bias else 0)
                 | (ALLOWED if self.allowed_token_ids else 0) | (LOGPROBS if self.logprobs is not None else 0))
        return np.array(row, dtype=np.float32).tobytes() + np.int32(flags).tobytes()

    @functools.cached_property
    def bias_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """logit_bias as (int64 token ids, float32 biases)."""
        bias = self.logit_bias or {}
        return np.fromiter(bias, np.int64, len(bias)), np.fromiter(bias.values(), np.float32, len(bias))

    @functools.cached_property
    def allowed_array(self) -> np.ndarray:
        return np.asarray(self.allowed_token_ids or [], dtype=np.int64)

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    def validate_for_model(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks that need the engine's limits (done when the request is added)."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            wanted = vocab_size if value == -1 else value  # -1: the whole vocabulary
            if value is not None and wanted > max_logprobs and max_logprobs != -1:
                raise ValueError(f"{name} must be <= {max_logprobs} (--max-logprobs), got {value}")
        for name, ids in (("allowed_token_ids", self.allowed_token_ids), ("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list(self.logit_bias or {}))):
            bad = [i for i in ids or [] if not 0 <= i < vocab_size]
            if bad:
                raise ValueError(f"{name} holds token ids outside [0, {vocab_size}): {bad[:5]}")
