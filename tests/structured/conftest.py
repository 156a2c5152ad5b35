"""Structured-output fixtures: the embedded model's real byte-level BPE tokenizer, compiler services
(exact and padded vocabulary), and a fake "model" that samples random logits through the bitmask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from structured import (
    BatchBitmask,
    GrammarCompilerService,
    RequestGrammar,
    accept_batch,
    unpack_bitmask,
)

MODEL_DIR = Path(__file__).resolve().parents[2] / "aio_engine" / "default_model"
VOCAB = 4096  # the default model's config.json vocab_size, equal to its tokenizer's
PADDED_VOCAB = VOCAB + 64  # an lm_head wider than the tokenizer: ids 4096.. are padding
ODD_VOCAB = 4101  # the odd_tokenizer's
EOS = 0  # <|endoftext|>; ids 1 and 2 are the other special tokens (<|im_start|>, <|im_end|>)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="session")
def odd_tokenizer():
    """The default tokenizer plus 5 text tokens (ids 4096-4100): 4101 tokens, not whole bitmask words."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    tokenizer.add_tokens([f"qqq{i}" for i in range(5)])
    assert len(tokenizer) == ODD_VOCAB
    return tokenizer


@pytest.fixture(scope="session")
def service(tokenizer):
    svc = GrammarCompilerService(tokenizer, VOCAB)
    yield svc
    svc.close()


@pytest.fixture(scope="session")
def padded_service(tokenizer):
    svc = GrammarCompilerService(tokenizer, PADDED_VOCAB)
    yield svc
    svc.close()


@pytest.fixture
def fresh_service(tokenizer):
    """A service of its own, for tests that read its counters or fill its cache."""
    services = []

    def make(**overrides) -> GrammarCompilerService:
        services.append(GrammarCompilerService(tokenizer, VOCAB, **overrides))
        return services[-1]

    yield make
    for svc in services:
        svc.close()


@pytest.fixture(scope="session")
def model_bias(tokenizer):
    """The fake model's fixed preferences, by vocabulary size.

    A uniformly random model almost never picks the one token that closes a JSON string out of
    thousands that continue it, so its outputs would run on forever. This bias favours closers
    ('"', '}', ']', ')', ',') and eos, like a model that likes short answers; everything else
    stays random. It also pushes hard on the special and padding ids, so that if the bitmask
    ever allowed one it would be sampled at once and the test would catch it.
    """
    closers = torch.zeros(VOCAB)
    for token_id in range(VOCAB):
        text = tokenizer.decode([token_id])
        if text and set(text) <= set('"}]),'):
            closers[token_id] = 4.0
    closers[EOS] = 4.0

    def bias(vocab_size: int) -> torch.Tensor:
        out = torch.zeros(vocab_size)
        out[:VOCAB] = closers
        out[[1, 2]] = 30.0
        out[VOCAB:] = 30.0
        return out

    return bias


@dataclass
class Generation:
    token_ids: list[list[int]]  # per constrained row, the stop token left out
    texts: list[str]
    terminated: list[bool]
    steps: int


@pytest.fixture(scope="session")
def generate(tokenizer, model_bias):
    """Decode a batch with a fake model: rows with a compiled grammar are constrained, None rows are not.

    Each step draws fresh logits (torch.randn with a seeded generator, plus the bias), fills the
    bitmask rows of the live constrained rows, applies it, samples every row at temperature 1.0,
    and feeds the constrained rows' tokens to their matchers. It checks, every step, that the
    unconstrained rows' logits are untouched and that a constrained row keeps exactly the
    tokens its bitmask allows, none of them special or padding.
    """

    def run(grammars: list, vocab_size: int = VOCAB, seed: int = 0, max_steps: int = 600) -> Generation:
        gen = torch.Generator().manual_seed(seed)
        bias = model_bias(vocab_size)
        rows = [i for i, g in enumerate(grammars) if g is not None]
        free = [i for i, g in enumerate(grammars) if g is None]
        matchers = {i: RequestGrammar(grammars[i]) for i in rows}
        outputs: dict[int, list[int]] = {i: [] for i in rows}
        bitmask = BatchBitmask(len(grammars), vocab_size)
        steps = 0
        while steps < max_steps:
            live = [i for i in rows if not matchers[i].is_terminated]
            if not live:
                break
            steps += 1
            bitmask.fill([matchers[i] for i in live], live)
            logits = torch.randn(len(grammars), vocab_size, generator=gen) + bias  # [rows, vocab]
            before = logits.clone()
            bitmask.apply(logits)
            assert torch.equal(logits[free], before[free]), "an unconstrained row was masked"
            allowed = unpack_bitmask(bitmask.host[live], vocab_size)  # [live, vocab]
            assert torch.equal(torch.isfinite(logits[live]), allowed)
            assert not allowed[:, [1, 2]].any() and not allowed[:, VOCAB:].any()
            sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0].tolist()
            tokens = [sampled[i] for i in live]
            assert all(accept_batch([matchers[i] for i in live], tokens)), "a sampled token was rejected"
            for i, token in zip(live, tokens):
                if not matchers[i].is_terminated:
                    outputs[i].append(token)
        token_ids = [outputs[i] for i in rows]
        return Generation(token_ids, [tokenizer.decode(ids) for ids in token_ids],
                          [matchers[i].is_terminated for i in rows], steps)

    return run
