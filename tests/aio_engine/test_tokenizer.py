"""Incremental detokenization: streamed pieces join to exactly what a one-shot decode gives,
for emoji and CJK split across byte-level tokens, on the fast (DecodeStream) and slow paths."""

from __future__ import annotations

import asyncio

import pytest

from aio_engine import RequestOutputKind, SamplingParams
from aio_engine.tokenizer import IncrementalDetokenizer, load_tokenizer

TEXTS = ["héllo 👋 世界 🚀🙂 日本語", "🚀🚀 x 語", "plain ascii, nothing special", "Ünïcödé — “quotes” … ß"]


class SlowOnly:
    """A tokenizer seen through `decode` alone (no `_tokenizer` backend): the slow branch."""

    def __init__(self, tokenizer) -> None:
        self._inner = tokenizer

    def decode(self, ids, **kwargs) -> str:
        return self._inner.decode(ids, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(str(tiny_models["llama"]))


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.step(token) for token in ids]


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_join_to_the_original_text(text, slow, tokenizer):
    ids = tokenizer(text).input_ids
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(SlowOnly(tokenizer) if slow else tokenizer, [], True)
    pieces = stream(detokenizer, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)  # no half characters are released


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_emoji_is_released_only_when_its_last_byte_arrives(slow, tokenizer):
    ids = tokenizer("🚀").input_ids
    assert len(ids) > 1  # the emoji's bytes span tokens
    detokenizer = IncrementalDetokenizer(SlowOnly(tokenizer) if slow else tokenizer, [], True)
    assert [detokenizer.step(token) for token in ids] == [""] * (len(ids) - 1) + ["🚀"]


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_dangling_partial_character_is_held_back(slow, tokenizer):
    ids = tokenizer("ab 🚀").input_ids[:-1]  # cut inside the emoji's bytes
    assert tokenizer.decode(ids).endswith("\ufffd")
    detokenizer = IncrementalDetokenizer(SlowOnly(tokenizer) if slow else tokenizer, [], True)
    assert "".join(stream(detokenizer, ids)) == tokenizer.decode(ids[:-1])


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_prompt_context_primes_the_first_output_token(slow, tokenizer):
    prompt = tokenizer("Hello world").input_ids
    output = tokenizer(" 世界 🙂 done").input_ids
    whole = tokenizer.decode(prompt + output)
    detokenizer = IncrementalDetokenizer(SlowOnly(tokenizer) if slow else tokenizer, prompt, True)
    assert "".join(stream(detokenizer, output)) == whole[len(tokenizer.decode(prompt)):]


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_or_kept(skip, tokenizer):
    ids = tokenizer("hi").input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")] + tokenizer(" yo").input_ids
    detokenizer = IncrementalDetokenizer(tokenizer, [], skip)
    assert "".join(stream(detokenizer, ids)) == tokenizer.decode(ids, skip_special_tokens=skip)


PROMPTS = ["Hello world! How are you", "The quick brown fox", "emoji 👋🙂🚀 and CJK 世界", "Numbers 0 1 2"]


async def test_random_tokens_stream_to_their_decode(make_async_engine):
    """Temperature 1 on a random model emits arbitrary byte tokens, partial UTF-8 included."""
    engine = make_async_engine()
    params = SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def one(i: int) -> tuple[str, list[int]]:
        text, ids = "", []
        async for out in engine.generate(PROMPTS[i % len(PROMPTS)], params):
            text += out.outputs[0].text
            ids += out.outputs[0].token_ids
        return text, ids

    results = await asyncio.gather(*(one(i) for i in range(12)))
    decoded = [engine.tokenizer.decode(ids, skip_special_tokens=True) for _, ids in results]
    assert sum(d.endswith("\ufffd") for d in decoded) > 0  # some outputs end inside a character
    assert [text for text, _ in results] == decoded


def test_prompt_ending_inside_a_character_leaks_no_prompt_text(tokenizer):
    prompt = [164, 236, 224, 6, 46, 141]  # decodes to '\ufffd\x7f$L' then a lone lead byte 0xCE
    output = [394, 430, 41]  # (0x8B completing it + an emoji's first bytes), an unknown id, 'G'
    assert tokenizer.decode(prompt).endswith("\ufffd")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, True)
    assert "".join(stream(detokenizer, output)) == tokenizer.decode(output)
