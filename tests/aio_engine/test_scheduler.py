"""Scheduler on hand-made requests: decodes before prefills, chunks within the token budget,
max_num_seqs, the priority policy, and which request preemption picks."""

from __future__ import annotations

from aio_engine.config import SchedulerConfig
from aio_engine.kv_cache import KVCacheManager
from aio_engine.request import Request, RequestStatus
from aio_engine.scheduler import Scheduler, SchedulerOutput
from sampling.params import SamplingParams

from .conftest import random_prompt

BS = 4


def make_scheduler(num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 16, policy: str = "fcfs",
                   chunked: bool = True, max_model_len: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, policy=policy,
                             enable_chunked_prefill=chunked, async_scheduling=False, stream_interval=1,
                             max_model_len=max_model_len)
    return Scheduler(config, KVCacheManager(num_blocks, BS, enable_prefix_caching=False))


def add(scheduler: Scheduler, request_id: str, prompt_len: int, priority: int = 0, max_tokens: int = 50,
        arrival: float | None = None) -> Request:
    seed = sum(map(ord, request_id))
    request = Request(request_id, random_prompt(prompt_len, seed=seed), SamplingParams(max_tokens=max_tokens),
                      priority=priority, arrival_time=float(len(scheduler.requests)) if arrival is None else arrival)
    scheduler.add_request(request)
    return request


def step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    """One step with a fixed sampled token wherever a row samples."""
    out = scheduler.schedule()
    scheduler.update_after_step(out, [token if s.samples else None for s in out.scheduled])
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    return [(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled]


def test_decodes_are_scheduled_before_a_new_prefill_takes_the_rest_of_the_budget():
    scheduler = make_scheduler(budget=16)
    add(scheduler, "a", 5)
    assert plan(step(scheduler)) == [("a", 5, True)]
    add(scheduler, "b", 30)
    out = step(scheduler)
    assert plan(out) == [("a", 1, True), ("b", 15, False)]
    assert out.num_tokens == 16


def test_chunked_prefill_splits_a_long_prompt_within_the_budget():
    scheduler = make_scheduler(budget=16)
    request = add(scheduler, "long", 40)
    chunks = [plan(step(scheduler)) for _ in range(4)]
    assert chunks == [[("long", 16, False)], [("long", 16, False)], [("long", 8, True)], [("long", 1, True)]]
    assert request.num_computed_tokens == 41 and request.output_token_ids == [7, 7]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    scheduler = make_scheduler(budget=32, chunked=False, max_model_len=32)
    add(scheduler, "a", 20)
    add(scheduler, "b", 20)
    assert plan(step(scheduler)) == [("a", 20, True)]  # b does not fit in the 12 tokens left
    assert plan(step(scheduler)) == [("a", 1, True), ("b", 20, True)]


def test_max_num_seqs_caps_the_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abcde":
        add(scheduler, name, 3, max_tokens=2)
    assert [s[0] for s in plan(step(scheduler))] == ["a", "b"]
    assert [s[0] for s in plan(step(scheduler))] == ["a", "b"]  # a and b finish here (2 tokens)
    assert [s[0] for s in plan(step(scheduler))] == ["c", "d"]
    assert len(scheduler.running) == 2


def test_priority_policy_admits_the_lowest_value_first_then_by_arrival():
    scheduler = make_scheduler(policy="priority")
    add(scheduler, "x", 3, priority=5, arrival=0.0)
    add(scheduler, "y", 3, priority=1, arrival=1.0)
    add(scheduler, "z", 3, priority=1, arrival=2.0)
    add(scheduler, "w", 3, priority=-1, arrival=3.0)
    assert [s[0] for s in plan(step(scheduler))] == ["w", "y", "z", "x"]


def test_fcfs_ignores_priority():
    scheduler = make_scheduler(policy="fcfs")
    add(scheduler, "x", 3, priority=5)
    add(scheduler, "y", 3, priority=0)
    assert [s[0] for s in plan(step(scheduler))] == ["x", "y"]


def three_requests_filling_the_cache(policy: str, priorities: tuple[int, int, int]) -> Scheduler:
    """a, b, c (in arrival order) with 7-token prompts fill all 6 blocks of 4 after 2 steps; the
    third step needs new blocks."""
    scheduler = make_scheduler(num_blocks=6, policy=policy)
    for name, priority in zip("abc", priorities):
        add(scheduler, name, 7, priority=priority)
    step(scheduler)
    step(scheduler)
    assert scheduler.kv.num_free_blocks == 0
    return scheduler


def test_preemption_under_fcfs_picks_the_newest_request():
    scheduler = three_requests_filling_the_cache("fcfs", (0, 0, 0))
    victim = scheduler.requests["c"]
    out = step(scheduler)
    assert out.preempted == [victim] and plan(out) == [("a", 1, True), ("b", 1, True)]
    assert victim.status == RequestStatus.PREEMPTED and victim.block_ids == []
    assert victim.num_computed_tokens == 0 and scheduler.waiting.peek() is victim
    assert scheduler.num_preemptions == 1


def test_preemption_under_priority_picks_the_lowest_priority_even_if_oldest():
    scheduler = three_requests_filling_the_cache("priority", (2, 0, 1))
    victim = scheduler.requests["a"]
    out = step(scheduler)
    assert out.preempted == [victim] and plan(out) == [("b", 1, True), ("c", 1, True)]
    assert victim.status == RequestStatus.PREEMPTED


def test_preempting_a_request_scheduled_earlier_in_the_step_gives_back_its_tokens():
    # a (low priority) needs no new block this step, b does: a was already scheduled when b preempts it.
    scheduler = make_scheduler(num_blocks=4, policy="priority")
    a = add(scheduler, "a", 6, priority=2)
    assert plan(step(scheduler)) == [("a", 6, True)]
    add(scheduler, "b", 8, priority=0)
    assert plan(step(scheduler)) == [("a", 1, True), ("b", 8, True)]
    assert scheduler.kv.num_free_blocks == 0
    out = step(scheduler)
    assert out.preempted == [a]
    assert plan(out) == [("b", 1, True)] and out.num_tokens == 1
    assert a.status == RequestStatus.PREEMPTED and a.num_tokens == 8  # its scheduled token was not run


def test_preempted_request_resumes_by_recomputing_its_prompt_and_outputs():
    scheduler = three_requests_filling_the_cache("fcfs", (0, 0, 0))
    victim = scheduler.requests["c"]
    step(scheduler)
    tokens = list(victim.all_token_ids)
    assert len(tokens) == 9
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)  # make room
    out = step(scheduler)
    assert ("c", 9, True) in plan(out)
    assert victim.all_token_ids == [*tokens, 7] and victim.status == RequestStatus.RUNNING
    assert victim.num_preemptions == 1


def test_finish_request_frees_running_and_waiting_requests():
    scheduler = make_scheduler(max_num_seqs=1)
    add(scheduler, "run", 5)
    add(scheduler, "wait", 5)
    step(scheduler)
    assert scheduler.kv.num_free_blocks < scheduler.kv.num_blocks
    for name in ("run", "wait"):
        request = scheduler.finish_request(name, RequestStatus.FINISHED_ABORTED)
        assert request.status.finish_reason == "abort"
    assert scheduler.finish_request("run", RequestStatus.FINISHED_ABORTED) is None
    assert not scheduler.has_unfinished and scheduler.kv.num_free_blocks == scheduler.kv.num_blocks


def test_request_reaching_max_model_len_finishes_with_length():
    scheduler = make_scheduler(max_model_len=8)
    request = add(scheduler, "a", 6, max_tokens=50)
    while scheduler.has_unfinished:
        step(scheduler)
    assert request.num_tokens == 8 and request.status == RequestStatus.FINISHED_LENGTH


def test_a_waiting_request_counts_one_prefix_lookup_however_often_it_is_peeked():
    config = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, policy="fcfs", enable_chunked_prefill=True,
                             async_scheduling=False, stream_interval=1, max_model_len=64)
    scheduler = Scheduler(config, KVCacheManager(5, BS, enable_prefix_caching=True))
    first = add(scheduler, "first", 16, max_tokens=3)
    second = Request("second", first.prompt_token_ids[:8] + [5, 5, 5], SamplingParams(max_tokens=3))
    scheduler.add_request(second)
    for _ in range(3):  # "first" holds every block: "second" is peeked and left waiting, step after step
        step(scheduler)
        assert second.status == RequestStatus.WAITING
    assert scheduler.kv.prefix_queries == 16 and scheduler.kv.prefix_hits == 0
    step(scheduler)
    assert second.status == RequestStatus.RUNNING
    assert scheduler.kv.prefix_queries == 16 + 11 and scheduler.kv.prefix_hits == 8
