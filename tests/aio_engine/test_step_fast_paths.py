"""The per-step shortcuts decide as the full checks do: allocate's early exit takes a block exactly
when a decode crosses a block boundary; the cheap stop test ends every request (eos, stop ids,
min_tokens, max_tokens, max_model_len, the cache's size) at the same token as the full check, in
both step orders; outputs that are not due (FINAL_ONLY, the stream interval) are skipped, not lost."""

from __future__ import annotations

import random

import pytest

from aio_engine.config import SchedulerConfig
from aio_engine.kv_cache import KVCacheManager
from aio_engine.output_processor import OutputProcessor
from aio_engine.request import Request, RequestStatus
from aio_engine.scheduler import Scheduler
from sampling.params import RequestOutputKind, SamplingParams

BS = 4


def make_scheduler(num_blocks: int, max_model_len: int, policy: str = "fcfs") -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, policy=policy,
                             enable_chunked_prefill=True, async_scheduling=True, stream_interval=1,
                             max_model_len=max_model_len)
    return Scheduler(config, KVCacheManager(num_blocks, BS, enable_prefix_caching=True))


def test_a_decode_takes_a_new_block_exactly_when_it_crosses_a_block_boundary():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    request = Request("r", [1, 2, 3, 4, 5], SamplingParams())
    assert kv.allocate(request, 5)
    for num_computed in range(5, 30):
        request.num_computed_tokens = num_computed
        free_before = kv.num_free_blocks
        assert kv.allocate(request, 1)
        crosses = num_computed % BS == 0  # the new token is the first of a block
        assert kv.num_free_blocks == free_before - crosses
        assert len(request.block_ids) == -(-(num_computed + 1) // BS)
    # Refused only when a block is needed and none is left; nothing changes then.
    while kv.num_free_blocks:
        kv._take_free_block()
    request.num_computed_tokens = len(request.block_ids) * BS - 1
    assert kv.allocate(request, 1)  # the last block still has room: no free block needed
    held = list(request.block_ids)
    request.num_computed_tokens += 1
    assert not kv.allocate(request, 1) and request.block_ids == held


def full_check_end(request: Request, max_model_len: int, cache_tokens: int):
    """(output length, status, stop reason) at which the pre-shortcut stop check ends the request,
    from its output tokens alone; None if none of them ends it."""
    params = request.sampling_params
    for num_output, token in enumerate(request.output_token_ids, start=1):
        num_tokens = request.num_prompt_tokens + num_output
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return num_output, RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return num_output, RequestStatus.FINISHED_STOPPED, token
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return num_output, RequestStatus.FINISHED_LENGTH, None
        if num_tokens >= max_model_len or num_tokens >= cache_tokens:
            return num_output, RequestStatus.FINISHED_LENGTH, None
    return None


def random_requests(rng: random.Random, count: int) -> list[Request]:
    """Requests whose stops come often: a vocabulary of 12 tokens, eos 0, stop ids among 1..3."""
    requests = []
    for i in range(count):
        max_tokens = rng.choice([None, 1, 2, 5, 9, 30])
        params = SamplingParams(
            max_tokens=max_tokens, min_tokens=min(rng.choice([0, 0, 2, 4]), max_tokens or 4),
            ignore_eos=rng.random() < 0.3, stop_token_ids=rng.sample([1, 2, 3], rng.randrange(3)),
        )
        prompt = [rng.randrange(4, 12) for _ in range(rng.randrange(1, 14))]
        requests.append(Request(f"r{i}", prompt, params, eos_token_ids=(0,)))
    return requests


@pytest.mark.parametrize("run_ahead", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", range(6))
def test_every_request_ends_at_the_token_the_full_stop_check_picks(seed, run_ahead):
    rng = random.Random(seed)
    max_model_len = rng.choice([16, 24, 40])
    num_blocks = rng.choice([5, 8, 64])  # 5 and 8 blocks: preemptions, and ends by the cache's size
    scheduler = make_scheduler(num_blocks, max_model_len)
    requests = [r for r in random_requests(rng, 12) if r.num_prompt_tokens < max_model_len]
    for request in requests:
        scheduler.add_request(request)
    rows = {r.request_id: 0 for r in requests}  # rows that sampled a token for it

    def finish(out) -> None:
        for sched in out.scheduled:
            rows[sched.request.request_id] += sched.samples
        scheduler.update_after_step(out, [rng.randrange(12) if s.samples else None for s in out.scheduled])

    in_flight = None
    for _ in range(500):
        if not scheduler.has_unfinished:
            break
        out = scheduler.schedule()
        if in_flight is not None:
            finish(in_flight)
        in_flight = out
        if not run_ahead:
            finish(in_flight)
            in_flight = None
    if in_flight is not None:
        finish(in_flight)
    assert not scheduler.has_unfinished

    for request in requests:
        assert request.num_tokens == len(request.all_token_ids) == request.num_prompt_tokens + request.num_output_tokens
        assert request.num_output_tokens == len(request.output_token_ids)
        expected = full_check_end(request, max_model_len, num_blocks * BS)
        assert (request.num_output_tokens, request.status, request.stop_reason) == expected, request.request_id
        # No row runs past max_tokens / max_model_len, even scheduled a step ahead (only an end by
        # a token, or by the cache's size, is seen too late to save the row after it).
        p = request.sampling_params
        if request.status == RequestStatus.FINISHED_LENGTH and request.num_preemptions == 0 and (
                request.num_output_tokens == p.max_tokens or request.num_tokens == max_model_len):
            assert rows[request.request_id] == request.num_output_tokens


def test_a_request_preempted_after_being_scheduled_in_the_same_step_gives_back_its_counts():
    # a (low priority) needs no new block in the third step and is scheduled; b then needs one,
    # and takes it by preempting a.
    scheduler = make_scheduler(num_blocks=4, max_model_len=64, policy="priority")
    a = Request("a", [5] * 6, SamplingParams(max_tokens=4), priority=2)
    b = Request("b", [6] * 8, SamplingParams(max_tokens=3), priority=0)
    scheduler.add_request(a)
    scheduler.update_after_step(scheduler.schedule(), [7])
    scheduler.add_request(b)
    scheduler.update_after_step(scheduler.schedule(), [7, 7])
    assert scheduler.kv.num_free_blocks == 0 and a.num_computed_tokens == 7
    out = scheduler.schedule()
    assert out.preempted == [a] and [s.request for s in out.scheduled] == [b] and out.num_tokens == 1
    assert (a.num_computed_tokens, a.num_pending) == (0, 0)  # as if never scheduled this step
    assert (b.num_computed_tokens, b.num_pending, out.scheduled[0].start) == (9, 1, 8)
    scheduler.update_after_step(out, [7])
    while scheduler.has_unfinished:  # a resumes once b is done, and gets all its tokens
        out = scheduler.schedule()
        scheduler.update_after_step(out, [7 if s.samples else None for s in out.scheduled])
    assert (a.num_output_tokens, b.num_output_tokens) == (4, 3)
    assert a.status == b.status == RequestStatus.FINISHED_LENGTH


@pytest.mark.parametrize("kind", list(RequestOutputKind))
@pytest.mark.parametrize("interval", [1, 3])
@pytest.mark.parametrize("n", [1, 2])
def test_outputs_come_at_the_stream_interval_and_at_the_end(kind, interval, n):
    processor = OutputProcessor(None, stream_interval=interval)
    params = SamplingParams(max_tokens=7, output_kind=kind)
    samples = [Request(f"{i}_r", [5, 6], params, index=i, parent_id="r") for i in range(n)]
    processor.add(samples, None)
    emitted = []
    for step in range(1, 8):
        for request in samples:
            request.status = RequestStatus.RUNNING
            request.append_token(step)
            if step == 7:
                request.status = RequestStatus.FINISHED_LENGTH
        for out in processor.process(samples, lambda *_: None):
            emitted.append((step, out.finished, [len(o.token_ids) for o in out.outputs]))
    if kind == RequestOutputKind.FINAL_ONLY:
        assert emitted == [(7, True, [7] * n)]
    elif kind == RequestOutputKind.DELTA:
        steps = [s for s in range(1, 8) if s % interval == 0] + ([7] if 7 % interval else [])
        sizes = [interval] * (len(steps) - 1) + [7 - (len(steps) - 1) * interval]
        assert emitted == [(s, s == 7, [size] * n) for s, size in zip(steps, sizes)]
    else:
        steps = [s for s in range(1, 8) if s % interval == 0] + ([7] if 7 % interval else [])
        assert emitted == [(s, s == 7, [s] * n) for s in steps]
    assert processor.parents == {} and processor.sample_of == {}
