"""SamplingParams validation: each invalid value raises a ValueError naming its field."""

from __future__ import annotations

import pytest

from sampling.params import RequestOutputKind, SamplingParams


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("n", 0), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("max_tokens", 0),
    ("min_tokens", -1), ("logprobs", -2), ("prompt_logprobs", -5), ("stop", [""]), ("allowed_token_ids", []),
])
def test_invalid_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0), dict(top_p=1.0), dict(top_k=-1), dict(top_k=0), dict(top_k=None), dict(n=1),
    dict(max_tokens=None), dict(min_p=0.0), dict(logprobs=-1),
])
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_stop_and_ids_are_normalised_to_lists():
    params = SamplingParams(stop="###", stop_token_ids=None, top_k=None)
    assert params.stop == ["###"] and params.stop_token_ids == [] and params.top_k == 0


def test_logit_bias_keys_become_ints_and_values_are_clamped():
    params = SamplingParams(logit_bias={"5": 250, 7: -1000.0, 9: 0.5})
    assert params.logit_bias == {5: 100.0, 7: -100.0, 9: 0.5}


def test_greedy_means_temperature_near_zero():
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.01).greedy


def test_clone_is_deep():
    params = SamplingParams(stop=["a"], output_kind=RequestOutputKind.DELTA)
    copy = params.clone()
    copy.stop.append("b")
    assert params.stop == ["a"] and copy.output_kind == RequestOutputKind.DELTA


@pytest.mark.parametrize("field, kwargs", [
    ("stop_token_ids", dict(stop_token_ids=[3, 600])), ("allowed_token_ids", dict(allowed_token_ids=[-1])),
    ("logit_bias", dict(logit_bias={512: 1.0})), ("logprobs", dict(logprobs=21)),
])
def test_model_limits_are_checked_when_added(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate_for_model(vocab_size=512, max_logprobs=20)
    SamplingParams().validate_for_model(vocab_size=512, max_logprobs=20)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_minus_one_asks_for_the_whole_vocabulary_and_counts_against_the_cap(field):
    with pytest.raises(ValueError, match=rf"^{field} must be <= 20 \(--max-logprobs\), got -1"):
        SamplingParams(**{field: -1}).validate_for_model(vocab_size=512, max_logprobs=20)
    SamplingParams(**{field: -1}).validate_for_model(vocab_size=512, max_logprobs=512)
    SamplingParams(**{field: -1}).validate_for_model(vocab_size=512, max_logprobs=-1)
