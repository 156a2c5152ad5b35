"""GrammarCompilerService: compiles GrammarSpecs with xgrammar, off the event loop, through an LRU.

It owns the tokenizer's xgrammar TokenizerInfo (built once, as wide as the tokenizer: the
model's padding ids are left to structured/bitmask.py), one xgrammar GrammarCompiler, a bounded
LRU of compiled grammars keyed by GrammarSpec, and a small thread pool. Concurrent requests for
one spec share one in-flight compile. xgrammar releases the GIL while it compiles, so the event
loop keeps running meanwhile. Matchers (structured/matcher.py) and bitmasks
(structured/bitmask.py) are built elsewhere.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar as xgr

from .config import StructuredOutputsConfig
from .params import StructuredOutputsParams
from .spec import GrammarSpec, to_spec

_WHAT = {"json": "JSON schema", "regex": "regex", "grammar": "EBNF grammar", "lark": "Lark grammar",
         "structural_tag": "structural tag"}
# xgrammar's C++ errors start with "[time] /path/file.cc:123: " and often "Check failed: (...) is false: ".
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def build_tokenizer_info(tokenizer, vocab_size: int | None = None,
                         stop_token_ids: list[int] | None = None) -> xgr.TokenizerInfo:
    """xgrammar's view of a Hugging Face tokenizer, with special tokens made unusable in text.

    vocab_size is the model's (its lm_head width). The TokenizerInfo covers only the tokenizer's
    ids (up to the model's width), rounded up to whole 32-token bitmask words: xgrammar's fill
    costs time per id, padding ids included, so the ids past that are never shown to it and
    BatchBitmask disallows them on its own. The few ids of the rounding get empty text, which
    xgrammar treats as special, so its last bitmask word never allows an id the tokenizer lacks.

    xgrammar reads special tokens such as <|im_start|> as their literal text, so it would let
    them appear inside a JSON string, and the detokenizer (skipping special tokens) would then
    drop them from the output. Blanking their text makes xgrammar treat them as special: never
    allowed, except stop tokens at the end.
    """
    stop = [stop_token_ids] if isinstance(stop_token_ids, int) else stop_token_ids
    vocab = tokenizer.get_vocab()
    tokens = max(vocab.values()) + 1  # added and special tokens included
    size = min((tokens + 31) // 32 * 32, vocab_size or tokens)
    detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size, stop_token_ids=stop)
    encoded = [""] * size
    for token, index in vocab.items():
        if index < size:
            encoded[index] = token
    for index in tokenizer.all_special_ids:
        if index < size:
            encoded[index] = ""
    return xgr.TokenizerInfo(encoded, vocab_type=detected.vocab_type, vocab_size=size,
                             stop_token_ids=list(detected.stop_token_ids),
                             add_prefix_space=detected.add_prefix_space)


class GrammarCompilerService:
    """One per tokenizer: `await compile(params)` returns an xgrammar CompiledGrammar (cached)."""

    def __init__(self, tokenizer, vocab_size: int | None = None, *,
                 config: StructuredOutputsConfig | None = None,
                 stop_token_ids: list[int] | None = None, **overrides) -> None:
        # overrides: any StructuredOutputsConfig field, e.g. max_cache_entries=4 in tests.
        base = config or StructuredOutputsConfig()
        self.config = StructuredOutputsConfig(**{**base.__dict__, **overrides}) if overrides else base
        self.tokenizer_info = build_tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self._vocab_size = vocab_size or self.tokenizer_info.vocab_size
        # xgrammar's own cache is unbounded; ours is the one cache, so it is turned off.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=self.config.compile_threads,
                                             cache_enabled=False)
        self._executor = ThreadPoolExecutor(self.config.compile_workers, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()  # guards the cache, the in-flight map and the counters
        self._cache: OrderedDict[GrammarSpec, xgr.CompiledGrammar] = OrderedDict()
        self._inflight: dict[GrammarSpec, Future] = {}
        self.num_compiles = 0  # compiles started (failed ones included)
        self.num_cache_hits = 0  # compile calls served from the cache or from a compile in flight

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (the logits' width); tokenizer_info.vocab_size may be smaller."""
        return self._vocab_size

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.tokenizer_info.stop_token_ids)

    def spec(self, params: StructuredOutputsParams) -> GrammarSpec:
        """Validate and normalize params (cheap, raises ValueError naming the field)."""
        return to_spec(params, self.config)

    async def compile(self, params: StructuredOutputsParams | GrammarSpec) -> xgr.CompiledGrammar:
        """Compile in a worker thread; a cancelled caller does not cancel others' shared compile."""
        future = self._submit(self._as_spec(params))
        if future.done():  # a cache hit: no trip through the executor
            return future.result()
        return await asyncio.shield(asyncio.wrap_future(future))

    def compile_sync(self, params: StructuredOutputsParams | GrammarSpec) -> xgr.CompiledGrammar:
        """Blocking compile, for offline use and tests (never call it on the event loop)."""
        return self._submit(self._as_spec(params)).result()

    def cached(self, params: StructuredOutputsParams | GrammarSpec) -> xgr.CompiledGrammar | None:
        """The compiled grammar if it is already in the cache (does not count as a hit)."""
        with self._lock:
            return self._cache.get(self._as_spec(params))

    def __len__(self) -> int:
        return len(self._cache)

    @property
    def cache_bytes(self) -> int:
        with self._lock:
            return sum(g.memory_size_bytes for g in self._cache.values())

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _as_spec(self, params) -> GrammarSpec:
        return params if isinstance(params, GrammarSpec) else self.spec(params)

    def _submit(self, spec: GrammarSpec) -> Future:
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                self.num_cache_hits += 1
                done: Future = Future()
                done.set_result(compiled)
                return done
            future = self._inflight.get(spec)
            if future is not None:
                self.num_cache_hits += 1
                return future
            self.num_compiles += 1
            future = self._executor.submit(self._compile, spec)
            self._inflight[spec] = future
            return future

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """Runs in a worker thread; publishes the result to the cache before the future resolves."""
        try:
            compiled = self._compile_uncached(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            with self._lock:
                self._inflight.pop(spec, None)
            raise ValueError(f"structured_outputs.{spec.field or spec.kind}: invalid {_WHAT[spec.kind]}: "
                             f"{_clean(e)}") from None
        with self._lock:
            self._inflight.pop(spec, None)
            self._cache[spec] = compiled
            while len(self._cache) > self.config.max_cache_entries:
                self._cache.popitem(last=False)
        return compiled

    def _compile_uncached(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        compiler = self._compiler
        if spec.kind == "json":
            return compiler.compile_json_schema(spec.source, any_whitespace=spec.any_whitespace)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.source)
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.source)
        if spec.kind == "lark":
            return compiler.compile_lark(spec.source)
        if spec.kind == "structural_tag":
            return compiler.compile_structural_tag(spec.source)
        raise AssertionError(f"unknown grammar kind {spec.kind!r}")


def _clean(error: Exception) -> str:
    """xgrammar's message without its C++ log prefix, on one line."""
    lines = [_LOG_PREFIX.sub("", line).strip() for line in str(error).strip().splitlines()]
    return " ".join(line for line in lines if line) or type(error).__name__
