"""KVCacheManager: block accounting, prefix hits along the hash chain, LRU eviction of freed
cached blocks, and refusals that leave the state untouched."""

from __future__ import annotations

import pytest

from aio_engine.kv_cache import KVCacheManager, block_hasher
from aio_engine.request import Request
from sampling.params import SamplingParams

from .conftest import random_prompt

BS = 4


def make_request(tokens: list[int], request_id: str = "r") -> Request:
    return Request(request_id, list(tokens), SamplingParams())


def admit(kv: KVCacheManager, request: Request) -> int:
    """Admit like the scheduler does: cached prefix, then the rest; compute and register it all."""
    cached = kv.find_cached_prefix(request)
    request.num_computed_tokens = 0
    assert kv.allocate(request, request.num_tokens - len(cached) * kv.block_size, cached)
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request, request.num_tokens)
    return len(cached)


def snapshot(kv: KVCacheManager) -> tuple:
    return (list(kv.ref_counts), list(kv.block_hash), dict(kv.cached), list(kv.free_queue))


def test_allocate_and_free_account_for_every_block():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    a, b = make_request(range(10), "a"), make_request(range(5), "b")
    assert kv.allocate(a, 10) and len(a.block_ids) == 3
    assert kv.allocate(b, 5) and len(b.block_ids) == 2
    assert kv.num_free_blocks == 5 and kv.usage == pytest.approx(0.5)
    assert not set(a.block_ids) & set(b.block_ids)
    # Growing by one token inside the last block takes nothing; crossing the boundary takes one.
    a.num_computed_tokens = 10
    assert kv.allocate(a, 2) and len(a.block_ids) == 3
    assert kv.allocate(a, 3) and len(a.block_ids) == 4
    kv.free(a)
    assert a.block_ids == [] and kv.num_free_blocks == 8
    kv.free(b)
    assert kv.num_free_blocks == 10 and all(c == 0 for c in kv.ref_counts)


def test_refused_allocation_leaves_state_unchanged():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    holder = make_request(random_prompt(9, seed=1), "holder")
    admit(kv, holder)  # 3 blocks, 2 of them full and cached
    kv.free(holder)  # all free again, the full ones still findable
    other = make_request(random_prompt(6, seed=2), "other")
    assert kv.allocate(other, 6)  # 2 blocks
    before = snapshot(kv)
    # A request reusing holder's 2 cached blocks needs 3 more blocks; 2 are free (one of them cached).
    greedy = make_request(holder.prompt_token_ids[:8] + random_prompt(12, seed=3), "greedy")
    cached = kv.find_cached_prefix(greedy)
    assert len(cached) == 2
    assert not kv.allocate(greedy, greedy.num_tokens - 8, cached)
    assert snapshot(kv) == before and greedy.block_ids == []


def test_prefix_hits_follow_the_hash_chain_and_stop_at_the_first_miss():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    base = random_prompt(13, seed=4)  # 3 full blocks + 1 token
    first = make_request(base, "first")
    assert admit(kv, first) == 0
    same_prefix = make_request(base[:12] + [7, 7, 7], "same")
    assert kv.find_cached_prefix(same_prefix) == first.block_ids[:3]
    # A different second block breaks the chain: the third block's tokens alone do not match.
    changed = list(base)
    changed[5] = (changed[5] + 1) % 400
    assert kv.find_cached_prefix(make_request(changed, "changed")) == first.block_ids[:1]
    # The block holding the last token is never reused: the model must compute at least one token.
    assert kv.find_cached_prefix(make_request(base[:12], "exact")) == first.block_ids[:2]


def test_shared_blocks_are_counted_once_and_freed_when_the_last_holder_leaves():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    base = random_prompt(9, seed=5)
    a, b = make_request(base, "a"), make_request(base[:8] + [1, 2, 3], "b")
    admit(kv, a)
    assert admit(kv, b) == 2
    assert b.block_ids[:2] == a.block_ids[:2]
    assert [kv.ref_counts[x] for x in a.block_ids[:2]] == [2, 2]
    assert kv.num_free_blocks == 8 - 3 - 1
    kv.free(a)
    assert kv.num_free_blocks == 8 - 3  # b still holds the shared two
    kv.free(b)
    assert kv.num_free_blocks == 8


def test_freed_cached_blocks_are_evicted_least_recent_first_and_lose_their_hash():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    old, new = make_request(random_prompt(8, seed=6), "old"), make_request(random_prompt(8, seed=7), "new")
    admit(kv, old)
    admit(kv, new)
    old_blocks, new_blocks = list(old.block_ids), list(new.block_ids)
    kv.free(old)
    kv.free(new)
    # Free order: the 2 never-used blocks, then old's blocks (last block first), then new's.
    assert list(kv.free_queue) == [4, 5, *reversed(old_blocks), *reversed(new_blocks)]
    probe_old = make_request(old.prompt_token_ids + [1], "probe-old")
    probe_new = make_request(new.prompt_token_ids + [1], "probe-new")
    taker = make_request(random_prompt(12, seed=8), "taker")  # 3 blocks: both unused ones, then old's last
    assert kv.allocate(taker, 12)
    assert taker.block_ids == [4, 5, old_blocks[1]]
    assert kv.block_hash[old_blocks[1]] is None
    assert old.block_hashes[1] not in kv.cached
    # old's chain is broken at its second block; new's is whole.
    assert kv.find_cached_prefix(probe_old) == old_blocks[:1]
    assert kv.find_cached_prefix(probe_new) == new_blocks


def test_reusing_a_cached_free_block_takes_it_out_of_the_free_queue():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request(random_prompt(5, seed=9), "a")
    admit(kv, a)
    kv.free(a)
    b = make_request(a.prompt_token_ids[:4] + [9, 9], "b")
    assert admit(kv, b) == 1
    assert a.block_ids == [] and b.block_ids[0] not in kv.free_queue
    assert kv.num_free_blocks == 4 - 2


@pytest.mark.parametrize("algo", ["sha256", "xxhash"])
def test_both_hash_algorithms_chain_and_find_prefixes(algo):
    hasher = block_hasher(algo)
    root = hasher(None, (1, 2, 3, 4))
    assert root == hasher(None, (1, 2, 3, 4))
    assert root != hasher(None, (1, 2, 3, 5))
    assert hasher(root, (5, 6)) != hasher(None, (5, 6))  # the parent is part of the hash
    kv = KVCacheManager(num_blocks=8, block_size=BS, hash_algo=algo)
    tokens = random_prompt(9, seed=10)
    first = make_request(tokens, "first")
    admit(kv, first)
    assert kv.find_cached_prefix(make_request(tokens, "again")) == first.block_ids[:2]


def test_unknown_hash_algorithm_is_refused():
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        KVCacheManager(num_blocks=4, block_size=BS, hash_algo="md5")


def test_prefix_caching_off_finds_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    tokens = random_prompt(9, seed=11)
    admit(kv, make_request(tokens, "a"))
    assert kv.find_cached_prefix(make_request(tokens, "b")) == []
    assert kv.cached == {}


def test_reset_prefix_cache_forgets_every_hash():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    tokens = random_prompt(9, seed=12)
    a = make_request(tokens, "a")
    admit(kv, a)
    kv.free(a)
    kv.reset_prefix_cache()
    assert kv.cached == {} and all(h is None for h in kv.block_hash)
    assert kv.find_cached_prefix(make_request(tokens, "b")) == []
