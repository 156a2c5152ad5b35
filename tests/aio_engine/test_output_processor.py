"""OutputProcessor on hand-made requests: the held-back tail of the text is flushed at the end,
and stop strings split across tokens are found and never streamed."""

from __future__ import annotations

import pytest

from aio_engine.output_processor import OutputProcessor
from aio_engine.request import Request, RequestStatus
from aio_engine.tokenizer import load_tokenizer
from sampling.params import RequestOutputKind, SamplingParams

from .test_tokenizer import SlowOnly


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return load_tokenizer(str(tiny_models["llama"]))


def feed(processor: OutputProcessor, request: Request, ids: list[int], finish_with: RequestStatus | None):
    """Append ids one step at a time, finishing the request with the last one; the outputs."""
    finished: list[str] = []

    def finish(request_id: str, status: RequestStatus) -> None:
        finished.append(request_id)
        request.status = status

    outputs = []
    request.status = RequestStatus.RUNNING
    for i, token in enumerate(ids):
        request.append_token(token)
        if i == len(ids) - 1 and finish_with is not None:
            request.status = finish_with
        outputs += processor.process([request], finish)
    return outputs


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
@pytest.mark.parametrize("kind", [RequestOutputKind.DELTA, RequestOutputKind.CUMULATIVE])
def test_cut_character_at_the_end_is_flushed_like_a_one_shot_decode(kind, slow, tokenizer):
    ids = tokenizer("ab 🚀 c 🐍").input_ids[:-1]  # ends inside 🐍's bytes
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert expected.endswith("\ufffd")
    processor = OutputProcessor(SlowOnly(tokenizer) if slow else tokenizer, stream_interval=1)
    request = Request("r", tokenizer("hi").input_ids, SamplingParams(max_tokens=len(ids), output_kind=kind))
    processor.add([request], None)
    outputs = feed(processor, request, ids, RequestStatus.FINISHED_LENGTH)
    texts = [o.outputs[0].text for o in outputs]
    assert ("".join(texts) if kind == RequestOutputKind.DELTA else texts[-1]) == expected
    assert outputs[-1].finished and processor.parents == {}


def test_stop_string_split_across_tokens_is_found_and_held_back(tokenizer):
    text = "Hello world! How are you today?"
    ids = tokenizer(text).input_ids
    processor = OutputProcessor(tokenizer, stream_interval=1)
    params = SamplingParams(max_tokens=100, stop=["are you"], output_kind=RequestOutputKind.DELTA)
    request = Request("r", [5], params)
    processor.add([request], None)
    outputs = feed(processor, request, ids, None)
    assert "".join(o.outputs[0].text for o in outputs) == "Hello world! How "
    final = outputs[-1].outputs[0]
    assert outputs[-1].finished and (final.finish_reason, final.stop_reason) == ("stop", "are you")
    assert len(request.output_token_ids) < len(ids) or request.status == RequestStatus.FINISHED_STOPPED


def test_abort_flushes_and_reports_abort(tokenizer):
    ids = tokenizer("x 🐍").input_ids[:-1]
    processor = OutputProcessor(tokenizer, stream_interval=1)
    request = Request("r", [5], SamplingParams(max_tokens=100))
    processor.add([request], None)
    feed(processor, request, ids, None)
    request.status = RequestStatus.FINISHED_ABORTED
    final = processor.finish_external(request)
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.outputs[0].text == tokenizer.decode(ids)
    assert processor.finish_external(request) is None


@pytest.mark.parametrize("slow", [False, True], ids=["fast", "slow"])
def test_final_only_decodes_once_at_the_end_with_the_text_a_stream_gets(slow, tokenizer):
    """FINAL_ONLY without stop strings is not detokenized step by step (its text is needed only
    at the end, decoded in one call); that text is the one a token-by-token stream builds, over
    random ids (byte pieces of cut characters and special tokens among them) after random
    prompts, with and without skip_special_tokens."""
    import random

    tok = SlowOnly(tokenizer) if slow else tokenizer
    rng = random.Random(7)
    vocab = len(tokenizer)
    for trial in range(40):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 9))]
        special = tokenizer.all_special_ids
        ids = [rng.choice(special) if rng.random() < 0.15 else rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        texts = {}
        for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
            processor = OutputProcessor(tok, stream_interval=1)
            params = SamplingParams(max_tokens=len(ids), output_kind=kind, skip_special_tokens=trial % 2 == 0,
                                    spaces_between_special_tokens=trial % 3 != 0)
            request = Request("r", prompt, params)
            processor.add([request], None)
            state = processor.sample_of["r"][1]
            steps = []
            state.detokenizer.step = lambda t, step=state.detokenizer.step, steps=steps: steps.append(t) or step(t)
            outputs = feed(processor, request, ids, RequestStatus.FINISHED_LENGTH)
            if kind == RequestOutputKind.FINAL_ONLY:
                assert steps == [] and len(outputs) == 1, "a final-only output was detokenized token by token"
            texts[kind] = (outputs[-1].outputs[0].text, outputs[-1].outputs[0].token_ids)
        assert texts[RequestOutputKind.FINAL_ONLY] == texts[RequestOutputKind.CUMULATIVE], (prompt, ids)


def test_final_only_abort_returns_every_token_so_far(tokenizer):
    ids = tokenizer("one two three").input_ids
    processor = OutputProcessor(tokenizer, stream_interval=1)
    request = Request("r", [5], SamplingParams(max_tokens=100, output_kind=RequestOutputKind.FINAL_ONLY))
    processor.add([request], None)
    assert feed(processor, request, ids, None) == []
    request.status = RequestStatus.FINISHED_ABORTED
    final = processor.finish_external(request)
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert final.outputs[0].token_ids == ids and final.outputs[0].text == tokenizer.decode(ids)
