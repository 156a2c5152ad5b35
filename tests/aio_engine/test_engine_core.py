"""EngineCore: stop conditions, the stream interval, output kinds, and what add_request refuses."""

from __future__ import annotations

import json

import pytest

from aio_engine import LLM, RequestOutput, RequestOutputKind, SamplingParams
from aio_engine.engine_core import EngineCore

from .conftest import random_prompt

PROMPT = random_prompt(12, seed=100)


def drain(core: EngineCore) -> dict[str, list[RequestOutput]]:
    """Step until every request is done; the outputs of each request, in order."""
    outputs: dict[str, list[RequestOutput]] = {}
    while core.has_unfinished:
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
    return outputs


def generate_one(core: EngineCore, params: SamplingParams, prompt=PROMPT) -> list[RequestOutput]:
    [request] = core.add_request(None, {"prompt_token_ids": prompt}, params)
    return drain(core)[request.request_id]


@pytest.fixture(scope="module")
def reference(make_llm):
    """Greedy tokens and text of PROMPT with no stop condition but the length."""
    [final] = generate_one(make_llm().core, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                           output_kind=RequestOutputKind.FINAL_ONLY))
    return final.outputs[0]


def pick_stop_string(text: str) -> tuple[str, int]:
    """A two-character piece of plain text from the middle of `text`, and where it first occurs."""
    for start in range(len(text) // 3, len(text) - 2):
        piece = text[start:start + 2]
        if piece.isprintable() and "\ufffd" not in piece and text.find(piece) > 0:
            return piece, text.find(piece)
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_ends_the_text_before_it_or_after_it(include, make_llm, reference):
    stop, at = pick_stop_string(reference.text)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop, "never-matches"],
                            include_stop_str_in_output=include)
    final = generate_one(make_llm().core, params)[-1].outputs[0]
    assert final.finish_reason == "stop"
    assert final.stop_reason == stop
    assert final.text == reference.text[: at + len(stop) if include else at]
    # Generation stopped at the token that completed the stop string.
    assert final.token_ids == reference.token_ids[: len(final.token_ids)]
    assert len(final.token_ids) < len(reference.token_ids)


def test_streamed_deltas_never_leak_a_stop_string(make_llm, reference):
    stop, at = pick_stop_string(reference.text)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=stop,
                            output_kind=RequestOutputKind.DELTA)
    outputs = generate_one(make_llm().core, params)
    assert len(outputs) > 1
    assert "".join(o.outputs[0].text for o in outputs) == reference.text[:at]


def test_stop_token_id_ends_generation_with_that_id(make_llm, reference):
    stop_id = reference.token_ids[2]
    first = reference.token_ids.index(stop_id)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id])
    final = generate_one(make_llm().core, params)[-1].outputs[0]
    assert final.token_ids == reference.token_ids[: first + 1]
    assert (final.finish_reason, final.stop_reason) == ("stop", stop_id)


def test_eos_from_the_generation_config_stops_unless_ignored(tiny_models, tmp_path, reference):
    eos = reference.token_ids[2]
    first = reference.token_ids.index(eos)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    llm = LLM(model=str(tiny_models["llama"]), max_model_len=128, num_gpu_blocks_override=64,
              generation_config=str(tmp_path))
    assert eos in llm.core.eos_token_ids
    stopped = generate_one(llm.core, SamplingParams(temperature=0, max_tokens=30))[-1].outputs[0]
    assert stopped.token_ids == reference.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", None)
    ignored = generate_one(llm.core, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[-1].outputs[0]
    assert ignored.token_ids == reference.token_ids
    assert ignored.finish_reason == "length"
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks


def test_max_tokens_ends_with_length(make_llm, reference):
    final = generate_one(make_llm().core, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[-1]
    assert final.finished
    assert final.outputs[0].token_ids == reference.token_ids[:7]
    assert (final.outputs[0].finish_reason, final.outputs[0].stop_reason) == ("length", None)


def test_min_tokens_holds_off_stop_ids_until_reached(make_llm, reference):
    stop_id = reference.token_ids[2]
    first = reference.token_ids.index(stop_id)
    min_tokens = first + 4
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_id],
                            min_tokens=min_tokens)
    final = generate_one(make_llm().core, params)[-1].outputs[0]
    assert len(final.token_ids) >= min_tokens
    if final.finish_reason == "stop":
        assert final.token_ids[-1] == stop_id
    else:
        assert len(final.token_ids) == 30


@pytest.mark.parametrize("max_tokens, expected", [(10, [4, 8, 10]), (8, [4, 8]), (3, [3])])
def test_stream_interval_yields_every_n_tokens_and_the_last(max_tokens, expected, make_llm):
    core = make_llm(stream_interval=4).core
    outputs = generate_one(core, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in outputs] == expected
    assert [o.finished for o in outputs] == [False] * (len(expected) - 1) + [True]


def test_output_kinds_agree_on_the_final_result(make_llm):
    core = make_llm().core
    results = {}
    for kind in RequestOutputKind:
        params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, output_kind=kind)
        results[kind] = generate_one(core, params)
    cumulative = results[RequestOutputKind.CUMULATIVE]
    assert [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 10))
    final = cumulative[-1].outputs[0]
    deltas = results[RequestOutputKind.DELTA]
    assert [len(o.outputs[0].token_ids) for o in deltas] == [1] * 9
    assert sum((o.outputs[0].token_ids for o in deltas), []) == final.token_ids
    assert "".join(o.outputs[0].text for o in deltas) == final.text
    [only] = results[RequestOutputKind.FINAL_ONLY]
    assert only.finished and only.outputs[0].token_ids == final.token_ids and only.outputs[0].text == final.text


def test_abort_returns_a_final_output_and_frees_blocks(make_llm):
    core = make_llm().core
    [request] = core.add_request("to-abort", {"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=50))
    while request.num_output_tokens < 3:  # with async scheduling a step's tokens arrive a step later
        core.step()
    assert core.kv.num_free_blocks < core.kv.num_blocks
    final = core.abort(request.request_id)
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert len(final.outputs[0].token_ids) == 3
    assert core.abort(request.request_id) is None  # unknown ids are ignored
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_prompt_as_long_as_max_model_len_is_refused_at_add_time(make_llm):
    core = make_llm().core  # max_model_len 128
    with pytest.raises(ValueError, match="max_model_len"):
        core.add_request(None, {"prompt_token_ids": random_prompt(128, seed=101)}, SamplingParams())
    core.add_request("fits", {"prompt_token_ids": random_prompt(127, seed=101)}, SamplingParams(max_tokens=5))
    [final] = [o for o in drain(core)["fits"] if o.finished]
    assert len(final.outputs[0].token_ids) == 1  # max_model_len leaves room for one token only
    assert final.outputs[0].finish_reason == "length"


def test_prompt_larger_than_the_whole_cache_is_refused_at_add_time(make_llm):
    core = make_llm(block_size=8, num_gpu_blocks_override=2).core
    with pytest.raises(ValueError, match="KV cache"):
        core.add_request(None, {"prompt_token_ids": random_prompt(20, seed=102)}, SamplingParams())
    assert not core.has_unfinished


@pytest.mark.parametrize("prompt, field", [
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [5, 512]}, "outside"),
    ({"prompt_token_ids": [5, -1]}, "outside"),
])
def test_bad_prompts_are_refused(prompt, field, make_llm):
    with pytest.raises(ValueError, match=field):
        make_llm().core.add_request(None, prompt, SamplingParams())


def test_stop_token_ids_outside_the_vocabulary_are_refused(make_llm):
    with pytest.raises(ValueError, match="stop_token_ids"):
        make_llm().core.add_request(None, {"prompt_token_ids": PROMPT}, SamplingParams(stop_token_ids=[10_000]))


def test_duplicate_request_id_is_refused_while_the_first_runs(make_llm):
    core = make_llm().core
    core.add_request("same", {"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="same"):
        core.add_request("same", {"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=3))
    assert len(drain(core)["same"]) == 3


def test_text_prompt_is_tokenized_and_echoed(make_llm):
    core = make_llm().core
    [request] = core.add_request(None, "Hello world! How are you", SamplingParams(temperature=0, max_tokens=2))
    assert request.prompt_token_ids == core.tokenizer("Hello world! How are you").input_ids
    final = drain(core)[request.request_id][-1]
    assert final.prompt == "Hello world! How are you"
    assert final.prompt_token_ids == request.prompt_token_ids
