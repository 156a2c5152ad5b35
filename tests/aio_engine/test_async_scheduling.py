"""Async scheduling with requests that sample from their tokens so far (grammars, penalties,
min_tokens, bad words): the next step's forward is queued before the step in flight is finished,
only its sampling waits for the host (EngineCore.phases, ModelRunner.sample), and the tokens are
exactly those of --no-async-scheduling for the same seeds, greedy or not. Requests that finish or
are aborted while their next step runs free their blocks and never touch their grammar again.

The embedded default model (a real tokenizer, so grammars and bad words work) on the CPU.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import pytest_asyncio

from aio_engine import LLM, AsyncEngine, EngineArgs, RequestOutput, SamplingParams
from aio_engine.engine_core import run_phases
from tests.aio_engine.test_structured_engine import (
    PROMPTS,
    SCHEMAS,
    constrained,
    token_bias,
    validate,
)

from .conftest import assert_all_blocks_free, wait_until_idle

ENGINE = dict(max_model_len=512, max_num_seqs=64)
TIMEOUT = 60
SCHEMA_NAMES = ["nested", "object_array", "refs", "enum_strings", "int_range", "string_patterns"]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(**ENGINE)
    assert llm.core.config.scheduler.async_scheduling
    yield llm
    llm.core.grammars.close()


@pytest.fixture(scope="module")
def llm_in_order():
    """The same engine with --no-async-scheduling: the reference for every token."""
    llm = LLM(**ENGINE, async_scheduling=False)
    yield llm
    llm.core.grammars.close()


@pytest_asyncio.fixture
async def engine():
    engine = AsyncEngine.from_engine_args(EngineArgs(**ENGINE))
    yield engine
    await engine.shutdown()


@pytest.fixture(autouse=True)
def _blocks_free(request):
    """Each test ends with every KV block of the module's engines free."""
    yield
    for name in ("llm", "llm_in_order"):
        if name in request.fixturenames:
            core = request.getfixturevalue(name).core
            try:
                assert_all_blocks_free(core)
            finally:  # a leak fails this test only
                while core.in_flight is not None:
                    core._finish_in_flight()
                for request_id in list(core.outputs.parents):
                    core.abort(request_id)


@pytest.fixture(scope="module")
def closers(llm) -> dict[int, float]:
    """logit_bias towards closing tokens and eos, so that a Shakespeare model's JSON ends."""
    bias = token_bias(llm.tokenizer, lambda t: set(t) <= set('"])}'), 6.0)
    bias.update(token_bias(llm.tokenizer, lambda t: t in ("]", "}"), 8.0))
    bias.update({eos: 8.0 for eos in llm.core.eos_token_ids})
    return bias


KINDS = ["mixed", "grammars", "penalties", "repetition", "min_tokens", "bad_words"]


def host_reading_batch(closers, temperature: float, tokenizer, kind: str) -> list[SamplingParams]:
    """Requests of one kind that samples from its tokens so far, and a plain one; "mixed": all of
    them (n=2 among the grammars). Each kind alone too: a step with any such row samples late
    whole, so only alone does each kind show that it waits for the host."""
    def sampled(seed: int, **kw) -> SamplingParams:
        return SamplingParams(**{"temperature": temperature, "seed": seed, "max_tokens": 24, **kw})

    def grammars() -> list[SamplingParams]:
        batch = [constrained(closers, 100 + i, max_tokens=120, json=SCHEMAS[name]) for i, name in enumerate(SCHEMA_NAMES)]
        batch[1].n = 2
        batch.append(constrained(closers, 110, max_tokens=40, regex=REGEX))
        batch.append(constrained(closers, 111, max_tokens=40, choice=CHOICE))
        for p in batch:
            p.temperature = temperature
        return batch

    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    kinds = {
        "grammars": grammars,
        "penalties": lambda: [sampled(120, presence_penalty=1.5, frequency_penalty=0.5)],
        "repetition": lambda: [sampled(121, repetition_penalty=1.3)],
        # eos and newline banned for 12 tokens (the model ends lines often)
        "min_tokens": lambda: [sampled(122, min_tokens=12, stop_token_ids=[newline])],
        "bad_words": lambda: [sampled(123, bad_words=["the", " and", "O"])],
    }
    plain = sampled(124, ignore_eos=True)  # never needs the host
    if kind != "mixed":
        return kinds[kind]() + [plain]
    both = sampled(125, min_tokens=4, presence_penalty=0.5, bad_words=["my"], logprobs=2)
    return [p for make in kinds.values() for p in make()] + [plain, both]


REGEX = r"[a-z]{2,6}(-[a-z]{2,6}){1,3}"
CHOICE = ["yes", "no", "perhaps"]


def run(llm: LLM, params: list[SamplingParams]) -> list[RequestOutput]:
    return llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params, use_tqdm=False)


def completions(outs: list[RequestOutput]):
    return [[(c.token_ids, c.finish_reason) for c in out.outputs] for out in outs]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", KINDS)
def test_host_reading_batch_runs_ahead_and_gives_the_in_order_tokens(llm, llm_in_order, closers, temperature, kind):
    params = host_reading_batch(closers, temperature, llm.tokenizer, kind)
    core = llm.core
    ahead, late = core.num_steps_run_ahead, core.num_late_samplings
    outs = run(llm, params)
    reference = run(llm_in_order, params)
    assert completions(outs) == completions(reference)
    for out, ref in zip(outs, reference):
        for c, r in zip(out.outputs, ref.outputs):
            assert c.text == r.text
            assert c.logprobs == r.logprobs
    # Decode steps ran ahead: the forward of the next step was queued before each was finished,
    # and the sampling of those steps waited for the host.
    decode_steps = max(len(c.token_ids) for out in outs for c in out.outputs) - 1
    assert core.num_steps_run_ahead - ahead >= decode_steps
    assert core.num_late_samplings - late >= (10 if kind == "min_tokens" else decode_steps - 1)
    assert llm_in_order.core.num_steps_run_ahead == llm_in_order.core.num_late_samplings == 0
    by_kind = dict(zip([p.min_tokens for p in params], outs))
    if 12 in by_kind:
        assert len(by_kind[12].outputs[0].token_ids) >= 12
    if kind not in ("mixed", "grammars"):
        return
    for name, out in zip(SCHEMA_NAMES, outs):
        for c in out.outputs:
            if temperature or c.finish_reason == "stop":  # greedy may repeat itself to max_tokens
                assert c.finish_reason == "stop", (name, c.text)
                validate(SCHEMAS[name], c.text)
    regex, choice = outs[len(SCHEMA_NAMES)], outs[len(SCHEMA_NAMES) + 1]
    assert re.fullmatch(REGEX, regex.outputs[0].text) or regex.outputs[0].finish_reason == "length"
    assert choice.outputs[0].text in CHOICE


def test_a_batch_without_host_reading_rows_never_samples_late(llm):
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=12, ignore_eos=True, top_p=0.9, logit_bias={5: 1.0})
              for i in range(6)]
    core = llm.core
    ahead, late = core.num_steps_run_ahead, core.num_late_samplings
    run(llm, params)
    assert core.num_steps_run_ahead - ahead >= 10
    assert core.num_late_samplings == late


def test_requests_finished_while_their_next_step_ran_never_reach_the_bitmask(llm, closers, monkeypatch):
    """Choices end after a few tokens, while the step after is queued: that row is sampled (its
    token dropped) without its matcher, terminated by then."""
    core, runner = llm.core, llm.core.runner
    fill = runner.bitmask.fill
    sample = core.sample
    finished_rows = 0

    def checked_fill(grammars, rows):
        assert not any(g.is_terminated for g in grammars), "a terminated matcher was filled"
        fill(grammars, rows)

    def counting_sample(out, launched):
        nonlocal finished_rows
        finished_rows += sum(out.scheduled[i].request.status.finished for i in launched.sample_rows)
        return sample(out, launched)

    monkeypatch.setattr(runner.bitmask, "fill", checked_fill)
    monkeypatch.setattr(core, "sample", counting_sample)
    params = [constrained(closers, seed, max_tokens=30, choice=["ay", "nay", "perchance"]) for seed in range(6)]
    params += [constrained(closers, 50, max_tokens=200, json=SCHEMAS["recursive_ref"])]
    outs = run(llm, params)
    for out in outs[:-1]:
        assert out.outputs[0].text in ("ay", "nay", "perchance")
    assert finished_rows > 0  # the case was exercised


@pytest.mark.parametrize("when", ["after_launch", "after_wait"])
def test_abort_while_a_late_sampled_step_is_in_flight_frees_blocks_and_leaves_its_grammar(llm, closers, when):
    core = llm.core
    victim = core.add_request("victim", PROMPTS[0], constrained(closers, 7, max_tokens=200, json=SCHEMAS["refs"]))[0]
    core.add_request("other", PROMPTS[1], constrained(closers, 8, max_tokens=200, json=SCHEMAS["nested"]))
    for _ in range(10):  # until it decodes, a step in flight
        core.step()
        if victim.num_output_tokens >= 3:
            break
    assert victim.num_output_tokens >= 3 and not victim.status.finished
    assert core.in_flight is not None
    phases = core.phases()
    call = next(phases)
    assert call.func == core.sample  # the step in flight's late sampling, queued before the next forward
    enqueue = phases.send(call())
    assert enqueue.func == core.enqueue
    launched = enqueue()
    assert launched.needs_sampling  # a grammar row, the step before still in flight
    if when == "after_launch":  # where AsyncEngine applies aborts that came during the enqueue
        final = core.abort("victim")
        wait = phases.send(launched)
    else:  # ... and those that came during the wait
        wait = phases.send(launched)
        result = wait()
        final = core.abort("victim")
    assert final.finished and final.outputs[0].finish_reason == "abort"

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the aborted request's grammar was used: .{name}")

    victim.grammar = Untouchable()
    assert victim.block_ids == [] and "victim" not in core.scheduler.requests
    try:
        call = wait if when == "after_launch" else phases.send(result)
        while True:
            call = phases.send(call())
    except StopIteration:
        pass
    assert core.in_flight is not None  # the step with the victim's dropped row
    outs = []
    while core.has_unfinished:
        outs += core.step()
    [other] = [o for o in outs if o.request_id == "other" and o.finished]
    validate(SCHEMAS["nested"], other.outputs[0].text)
    assert all(o.request_id != "victim" for o in outs)


@pytest.mark.parametrize("steps_before", [1, 2], ids=["prefill_in_flight", "late_sampling_in_flight"])
def test_run_phases_of_finish_in_flight_finishes_the_step(llm, steps_before):
    """The part of the pipeline profile_step.py calls: the step in flight, waited for and finished
    (sampled first when its sampling is still to be queued)."""
    core = llm.core
    core.add_request("solo", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.2))
    for _ in range(steps_before):
        core.step()
    assert core.in_flight is not None
    assert core.in_flight[1].needs_sampling == (steps_before == 2)  # a decode step: penalties read the host
    core._finish_in_flight()
    assert core.in_flight is None
    outs = []
    while core.has_unfinished:
        outs += run_phases(core.phases())
    assert len(outs[-1].outputs[0].token_ids) == 5


def test_late_sampling_and_the_next_forward_are_queued_back_to_back(llm, monkeypatch):
    """The next step is scheduled and staged (inputs built and uploaded) before the step in
    flight's late sampling is queued, so that sampling and the next forward go to the GPU one
    right after the other, with no host work between them."""
    core, calls = llm.core, []

    def logged(name, fn):
        def call(*args):
            calls.append(name)
            return fn(*args)
        return call

    for name in ("schedule", "stage", "sample", "enqueue"):
        monkeypatch.setattr(core, name, logged(name, getattr(core, name)))
    monkeypatch.setattr(core.runner, "wait", logged("wait", core.runner.wait))
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=8, ignore_eos=True, presence_penalty=0.5)
              for i in range(3)]
    run(llm, params)
    late = [i for i, name in enumerate(calls) if name == "sample"]
    assert len(late) >= 6  # every decode step samples late
    for i in late[:-1]:  # each but the last (no step after it) has the next step's stage before it
        assert calls[i - 2 : i + 3] == ["schedule", "stage", "sample", "enqueue", "wait"], calls[i - 2 : i + 3]
    assert calls[late[-1] + 1] == "wait"  # the last: nothing left to schedule, waited for at once


async def test_async_engine_runs_host_reading_requests_ahead_with_the_in_order_tokens(engine, llm_in_order, closers):
    params = host_reading_batch(closers, 1.0, llm_in_order.tokenizer, "mixed")
    reference = run(llm_in_order, params)

    async def final(i: int, p: SamplingParams) -> RequestOutput:
        return [out async for out in engine.generate(PROMPTS[i % len(PROMPTS)], p)][-1]

    # One more request, aborted mid-flight by leaving its stream: its blocks come back.
    async def left_early() -> None:
        stream = engine.generate(PROMPTS[3], constrained(closers, 9, max_tokens=200, json=SCHEMAS["refs"]))
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 4:
                break
        await stream.aclose()

    outs = await asyncio.wait_for(asyncio.gather(*(final(i, p) for i, p in enumerate(params)), left_early()), TIMEOUT)
    assert completions(outs[:-1]) == completions(reference)
    assert engine.core.num_steps_run_ahead > 10 and engine.core.num_late_samplings > 10
    await wait_until_idle(engine)
    assert_all_blocks_free(engine.core)


def test_a_token_that_breaks_its_grammar_fails_that_request_alone(llm, monkeypatch):
    """A token the grammar refuses (here the mask is never uploaded nor applied, so the sampler draws freely)
    ends its request with finish_reason "error", its final output delivered, while its next
    step is already queued (async scheduling), and leaves the other requests alone."""
    runner = llm.core.runner
    monkeypatch.setattr(runner.bitmask, "upload", lambda logits, stream=None: runner.bitmask.finish_fill())
    params = [constrained(None, seed, max_tokens=40, regex="[0-9]{30}") for seed in range(4)]
    params[0].ignore_eos = True  # an eos then is no stop: the grammar refuses it where it is accepted at once
    params.append(SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))
    outs = run(llm, params)
    assert [o.outputs[0].finish_reason for o in outs[:4]] == ["error"] * 4
    assert all(len(o.outputs[0].token_ids) < 40 for o in outs[:4])
    assert len(outs[4].outputs[0].token_ids) == 12 and outs[4].outputs[0].finish_reason == "length"


async def test_async_engine_delivers_the_error_of_a_token_that_broke_its_grammar(engine, monkeypatch):
    runner = engine.core.runner
    monkeypatch.setattr(runner.bitmask, "upload", lambda logits, stream=None: runner.bitmask.finish_fill())

    async def final(p: SamplingParams) -> RequestOutput:
        return [out async for out in engine.generate(PROMPTS[0], p)][-1]

    outs = await asyncio.wait_for(asyncio.gather(*(final(constrained(None, seed, max_tokens=40, regex="[0-9]{30}"))
                                                   for seed in range(3))), TIMEOUT)
    assert [o.outputs[0].finish_reason for o in outs] == ["error"] * 3
    await wait_until_idle(engine)
    assert_all_blocks_free(engine.core)
