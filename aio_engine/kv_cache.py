"""KV-cache manager: paged blocks, prefix caching by chained block hashes, LRU eviction.

Owns which physical block holds which tokens of which request. A block is either in use
(ref_count > 0: held by one or more requests) or free; free blocks sit in an LRU queue and, when
they hold a full block of hashed tokens, stay findable by hash until evicted for reuse. The
scheduler asks for slots; the runner only sees block ids.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Callable

from .request import Request

try:
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a declared dependency
    xxhash = None


def block_hasher(algo: str) -> Callable[[bytes | None, tuple[int, ...]], bytes]:
    """hash(parent hash, the block's token ids) for the chosen algorithm."""
    if algo == "sha256":
        return lambda parent, tokens: hashlib.sha256(pickle.dumps((parent, tokens), protocol=5)).digest()
    if algo == "xxhash":
        if xxhash is None:
            raise ValueError("prefix_caching_hash_algo xxhash needs the xxhash package")
        return lambda parent, tokens: xxhash.xxh3_128_digest(pickle.dumps((parent, tokens), protocol=5))
    raise ValueError(f"prefix_caching_hash_algo must be sha256 or xxhash, got {algo!r}")


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_algo: str = "sha256") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._hash = block_hasher(hash_algo)
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        # Free blocks, least recently freed first; the value is unused.
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # Statistics for /metrics and tests.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # --- queries ---
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix caching ---
    def _update_hashes(self, request: Request) -> None:
        """Extend the request's chain of full-block hashes to cover all its full blocks."""
        full = request.num_tokens // self.block_size
        tokens = request.all_token_ids
        bs = self.block_size
        while len(request.block_hashes) < full:
            i = len(request.block_hashes)
            parent = request.block_hashes[-1] if i else None
            request.block_hashes.append(self._hash(parent, tuple(tokens[i * bs:(i + 1) * bs])))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks already holding this request's leading full blocks (at least one token left to compute)."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []  # prompt logprobs need the logits of every prompt position (as vLLM does)
        self._update_hashes(request)
        # Never reuse the block holding the last token: the model must run on at least one token.
        usable = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in request.block_hashes[:usable]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Count one admitted request's lookup for the hit rate (a request peeked but not admitted
        is looked up again next step, and must not count twice)."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_cached_tokens

    def _touch(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:  # evict from the prefix cache
            if self.cached.get(old) == block:
                del self.cached[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    # --- allocation ---
    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make the request's blocks cover num_computed + num_new tokens; False (nothing changed) if short."""
        if not cached_blocks:
            num_tokens = request.num_computed_tokens + num_new_tokens
            if num_tokens <= len(request.block_ids) * self.block_size:
                return True  # the common decode case: the last block still has room
            new = self.blocks_needed(num_tokens) - len(request.block_ids)
            if new > self.num_free_blocks:
                return False
            request.block_ids.extend(self._take_free_block() for _ in range(new))
            return True
        covered = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        needed = self.blocks_needed(covered)
        new = needed - len(request.block_ids) - len(cached_blocks)
        # Cached blocks that sit in the free queue stop being free once taken.
        reclaimed = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        if new > self.num_free_blocks - reclaimed:
            return False
        for block in cached_blocks:
            self._touch(block)
        request.block_ids.extend(cached_blocks)
        request.num_hashed_blocks = len(request.block_ids)  # cache hits are registered already
        request.block_ids.extend(self._take_free_block() for _ in range(max(new, 0)))
        return True

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks whose tokens are all computed, so others can find them."""
        if not self.enable_prefix_caching:
            return
        full = min(num_computed_tokens // self.block_size, len(request.block_ids))
        if full <= request.num_hashed_blocks:
            return  # no block filled up since the last call
        self._update_hashes(request)
        full = min(full, len(request.block_hashes))
        for i in range(request.num_hashed_blocks, full):
            block = request.block_ids[i]
            if self.block_hash[block] is not None:
                continue
            block_hash = request.block_hashes[i]
            self.block_hash[block] = block_hash
            self.cached.setdefault(block_hash, block)
        request.num_hashed_blocks = max(request.num_hashed_blocks, full)

    def free(self, request: Request) -> None:
        """Drop the request's hold on its blocks; its last blocks become the first evicted."""
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        request.block_ids = []
        request.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block in self.cached.values():
            self.block_hash[block] = None
        self.cached.clear()
