"""RequestGrammar: where one sequence stands in its grammar (an xgrammar GrammarMatcher).

One per sequence (a request with n > 1 has n of them, all on one CompiledGrammar). The engine
feeds it every token the sequence keeps, in order, and asks it for the sequence's bitmask row
(structured/bitmask.py fills many rows in one call).

End of output: once the grammar is complete, xgrammar allows only the stop tokens (the model's
eos ids, from the TokenizerInfo); accepting one terminates the matcher, and the request should
finish with finish_reason "stop". Where the grammar may also go on (regex "a+"), eos competes
with the continuations. A terminated matcher allows nothing more; its bitmask row allows only
the stop tokens, so a token sampled for it one step late (async scheduling) is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xgrammar as xgr
from tvm_ffi._ffi_api import ArrayContains as _array_contains  # xgrammar's FFI (tvm_ffi): one call
from xgrammar.base import (
    _core as _xgr_core,  # xgrammar's C++ batch calls, under its Python wrappers
)


class RequestGrammar:
    """A grammar matcher with a token count, so that rollbacks are checked before xgrammar sees them."""

    __slots__ = ("matcher", "num_tokens", "stop_token_ids", "vocab_size", "_handle", "_stops", "_terminated")

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self._handle = self.matcher._handle  # what xgrammar's batch calls take (accept_batch)
        self.stop_token_ids: list[int] = list(self.matcher.stop_token_ids)
        self._stops = frozenset(self.stop_token_ids)
        self.vocab_size = compiled.tokenizer_info.vocab_size  # the bitmask row's width in tokens
        self.num_tokens = 0  # tokens accepted (the stop token included) and not rolled back
        self._terminated = False

    @property
    def is_terminated(self) -> bool:
        """A stop token was accepted: the output is complete and nothing more is allowed.

        Kept here rather than asked of xgrammar (a call through its FFI per sequence, twice a
        step): its matcher terminates exactly when it accepts a stop token (it accepts one only
        where the grammar may end, and nothing after it), and rolling that token back revives it."""
        return self._terminated

    def _accepted(self, token_id: int) -> None:
        self.num_tokens += 1
        if token_id in self._stops:
            self._terminated = True

    def stops_at(self, token_id: int) -> bool:
        """Accepting this token would terminate the grammar (it is a stop token)."""
        return token_id in self._stops

    @property
    def is_completed(self) -> bool:
        """The output so far is a whole sentence of the grammar (a stop token is allowed next)."""
        return self.matcher.is_completed()

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the grammar does not allow it."""
        if self.matcher.accept_token(token_id):
            self._accepted(token_id)
            return True
        return False

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advance token by token; on the first rejected token stop and return False.

        The tokens before the rejected one stay accepted (roll them back if they must go).
        A rejected token means the sampler did not honour the bitmask: the request's output no
        longer follows its grammar and the engine should fail it.
        """
        for token_id in token_ids:
            if not self.accept_token(int(token_id)):
                return False
        return True

    def rollback(self, num_tokens: int) -> None:
        """Forget the last num_tokens accepted tokens (e.g. ones a stop string or a draft dropped)."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"rollback: num_tokens must be in [0, {self.num_tokens}], got {num_tokens}")
        if num_tokens:
            self.matcher.rollback(num_tokens)
            self.num_tokens -= num_tokens
            self._terminated = False  # the stop token, if any, was the last one accepted

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self.matcher.reset()
        self.num_tokens = 0
        self._terminated = False

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write this sequence's allowed next tokens into bitmask[row] (a CPU int32 tensor of
        ceil(vocab_size / 32) words per row)."""
        if self.is_terminated:
            fill_stop_row(bitmask, row, self.stop_token_ids)
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)


def accept_batch(grammars: Sequence[RequestGrammar], token_ids: Sequence[int]) -> list[bool]:
    """Each grammar accepts its one token (a decode step), in one call into xgrammar.

    xgrammar's own batch_accept_token reads its result array element by element, two calls
    through its FFI each (~100 us for 64 rows); here one call asks whether any token was
    rejected (normally none: the sampler honours the bitmask) and only then are they read."""
    if len(grammars) != len(token_ids):
        raise ValueError(f"accept_batch: {len(grammars)} grammars but {len(token_ids)} tokens")
    tokens = [int(t) for t in token_ids]
    return settle_accepts(grammars, tokens, batch_accept_token([g._handle for g in grammars], tokens, False))


# xgrammar's C++ batch accept, under its Python wrapper: (matcher handles, tokens, debug) -> an
# FFI array of 0/1, run without the GIL (BatchBitmask may run it in its worker thread).
batch_accept_token = _xgr_core.BatchGrammarMatcher.batch_accept_token


def settle_accepts(grammars: Sequence[RequestGrammar], tokens: list[int], result) -> list[bool]:
    """Count the tokens batch_accept_token took (`result`) into their grammars; which it took."""
    accepted = [bool(ok) for ok in result] if _array_contains(result, 0) else [True] * len(tokens)
    for grammar, token, ok in zip(grammars, tokens, accepted):
        if ok:
            grammar._accepted(token)
    return accepted


def fill_stop_row(bitmask: torch.Tensor, row: int, stop_token_ids: Sequence[int]) -> None:
    """bitmask[row] allows exactly the stop tokens."""
    bitmask[row].zero_()
    for token_id in stop_token_ids:
        word, bit = divmod(token_id, 32)
        # Bit 31 makes the int32 word negative; compute it in Python ints and wrap.
        value = (int(bitmask[row, word]) & 0xFFFFFFFF) | (1 << bit)
        bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value
