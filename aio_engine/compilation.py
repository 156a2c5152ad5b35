"""torch.compile of the model between attention calls, and the piecewise CUDA graphs of its pieces.

The model's forward is cut at attention (`model.pieces()`, see models/llama.py): the first piece
(embedding, first layer up to attention), one middle piece per later layer (the layer before it
after attention, this one up to attention), the last piece (last layer after attention, final
norm). Attention (KV write + paged attention) runs eagerly between the pieces, so inductor never
sees it and the pieces are plain functions of modules and tensors. Each kind of piece is compiled
once by inductor, dynamic in the token count (the middle kind serves every layer: the weights
are inputs), in two variants: one returns its results, one writes them into persistent buffers
sized for the largest batch.

Because the second reads and writes those buffers, each piece can be captured in a CUDA graph
per token count (PIECEWISE): a batch of up to the largest capture size is padded up to the next
size (the pieces run on the padded rows, attention and the KV write on the real ones only, so
padding writes no KV), and replays one graph per piece with attention launched between them.
Larger batches run the returning variant without graphs, and the runner's FULL decode graphs
capture it whole (attention inside): there no buffer copy is needed.

What the pieces own: the buffers (q, k, v, residual, attention output, final hidden states) and
the graphs. What they leave: the batch, the KV cache and its metadata (the runner's).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import hashlib
import json
import logging
import os
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from kernels.attention import AttentionMetadata

from .config import CompilationConfig, EngineConfig
from .models.layers import set_compiler_fusion

logger = logging.getLogger(__name__)


def configure_caches(config: EngineConfig) -> None:
    """Keep inductor's and Triton's compiled code on disk under the cache_dir (process-wide), so a
    second start reuses it. Inductor has no setting for its folder other
    than the variable it reads itself, so it is set here, once, from the config. Inductor itself is
    imported (seconds) only when the model compiles: -O0 runs Triton kernels, not inductor.

    Inductor's folder is one per cache_key(config): its cache served a graph compiled for the
    buffers of one token budget (8192 rows, static once a capture size equals the budget) to a
    start with another (2048), which failed the graph's size check (H100, 2026-11-24). Triton's
    cache is keyed by each kernel's source and shared."""
    import triton

    root = Path(config.compilation.cache_dir).expanduser()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor" / cache_key(config))
    triton.knobs.cache.dir = str(root / "triton")
    if config.compilation.mode == "compile":
        torch._inductor.config.fx_graph_cache = True  # compiled graphs, keyed by graph and options
        torch._inductor.config.autotune_local_cache = True


def cache_key(config: EngineConfig) -> str:
    """What the compiled graphs depend on beyond their own code: the model's shape, dtype, the
    sizes of the buffers they read (the token budget, and the context through the rotary cache),
    the compile options and the library versions. Not the seats or the block size: attention,
    which reads those, runs between the compiled pieces."""
    import triton

    hf = config.model.hf_config.to_dict() if hasattr(config.model.hf_config, "to_dict") else vars(config.model.hf_config)
    shape = {k: v for k, v in hf.items() if not k.startswith("_") and k != "transformers_version"}
    cc, sc = config.compilation, config.scheduler
    parts = dict(
        model=shape, architecture=config.model.architecture, dtype=str(config.model.dtype),
        max_model_len=config.model.max_model_len, max_num_batched_tokens=sc.max_num_batched_tokens, mode=cc.mode,
        cudagraph_mode=cc.cudagraph_mode, enable_fusion=cc.enable_fusion, inductor=cc.inductor_compile_config,
        torch=torch.__version__, triton=triton.__version__, device=str(config.device.type),
    )
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def graph_capture(graph: torch.cuda.CUDAGraph, pool, stream: torch.cuda.Stream):
    """Capture into `graph` on `stream` in the shared `pool`. Unlike torch.cuda.graph, without a
    gc.collect() and empty_cache() per graph: thousands of graphs are captured (see no_gc)."""
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            yield graph
        finally:
            graph.capture_end()


@contextlib.contextmanager
def no_gc():
    """One collection up front, none while the graphs are captured (a collection would cost
    tens of milliseconds per graph once compiled code fills the heap)."""
    gc.collect()
    torch.cuda.empty_cache()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _run(piece: Callable, modules: tuple, inputs: tuple):
    """One piece of the forward, returning its results (for FULL graphs and batches without graphs)."""
    return piece(*modules, *inputs)


def _run_into(piece: Callable, modules: tuple, inputs: tuple, outs: tuple) -> None:
    """One piece of the forward, its results written into persistent buffers (`outs`): what the
    piecewise graphs run, so that each graph reads what the one before it wrote."""
    values = piece(*modules, *inputs)
    if isinstance(values, torch.Tensor):
        values = (values,)
    for out, value in zip(outs, values):
        out.copy_(value)


def _own_copy(fn: Callable, name: str) -> Callable:
    """`fn` with a code object of its own: dynamo keeps compiled code per code object, so each
    engine's kind of piece gets its own cache (two entries: one token, and any other count)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class PiecewiseForward:
    """The model's forward as compiled pieces with eager attention between them, and their graphs."""

    def __init__(self, model: torch.nn.Module, compilation: CompilationConfig, max_num_tokens: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.pieces = model.pieces()
        self.attention = [layer.self_attn for layer in model.model.layers]
        self.max_num_tokens = max_num_tokens
        self.device = device
        set_compiler_fusion(model, compilation.enable_fusion)
        attn = self.attention[0]
        hidden_size = model.config.hidden_size
        # Persistent inputs and outputs of the pieces, zeroed so that padding rows stay finite.
        zeros = dict(dtype=dtype, device=device)
        self.q = torch.zeros(max_num_tokens, attn.num_heads, attn.head_dim, **zeros)
        self.k = torch.zeros(max_num_tokens, attn.num_kv_heads, attn.head_dim, **zeros)
        self.v = torch.zeros(max_num_tokens, attn.num_kv_heads, attn.head_dim, **zeros)
        self.residual = torch.zeros(max_num_tokens, hidden_size, **zeros)
        self.attn_out = torch.zeros(max_num_tokens, attn.num_heads, attn.head_dim, **zeros)
        self.hidden = torch.zeros(max_num_tokens, hidden_size, **zeros)
        # Token ids and positions for compiling (made here, not under inference mode: dynamo guards
        # on the kind of tensor, and the steps' buffers are ordinary ones).
        self.scratch_ids = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)

        def compile_(fn: Callable, name: str):
            return torch.compile(_own_copy(fn, name), backend="inductor", fullgraph=True,
                                 options=dict(compilation.inductor_compile_config) or None)

        # Two compiled variants of each kind of piece: returning its results, and writing them into
        # the buffers (an extra copy where a result comes straight from a matmul: only for the
        # piecewise graphs, which need fixed addresses between pieces).
        kinds = ("first", "middle", "last")
        self.compiled = {kind: compile_(_run, f"piece_{kind}") for kind in kinds}
        self.compiled_into = {kind: compile_(_run_into, f"piece_{kind}_into") for kind in kinds}
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}  # token count -> one graph per piece
        self.graph_sizes: list[int] = []
        self.graph_input_ids: torch.Tensor | None = None  # the buffers the first piece's graphs read
        self.graph_positions: torch.Tensor | None = None
        self.graph_replays = 0
        self.piecewise = compilation.piecewise_graphs  # compile the buffer variant up front

    def _kind(self, index: int) -> str:
        return "first" if index == 0 else "middle" if index < len(self.pieces) - 1 else "last"

    def _run_piece_into(self, index: int, num_tokens: int, input_ids, positions, dynamic: bool = False) -> None:
        """Piece `index` over the first `num_tokens` rows of the buffers."""
        fn, modules = self.pieces[index]
        n, kind = num_tokens, self._kind(index)
        if kind == "first":
            inputs, outs = (input_ids, positions, self.model.rope), (self.q[:n], self.k[:n], self.v[:n], self.residual[:n])
        elif kind == "middle":
            inputs = (self.attn_out[:n], self.residual[:n], positions, self.model.rope)
            outs = (self.q[:n], self.k[:n], self.v[:n], self.residual[:n])
        else:
            inputs, outs = (self.attn_out[:n], self.residual[:n]), (self.hidden[:n],)
        if dynamic:
            _mark_token_dim(inputs + outs, self.model.rope)
        self.compiled_into[kind](fn, modules, inputs, outs)

    def _run_piece(self, index: int, inputs: tuple, dynamic: bool = False):
        fn, modules = self.pieces[index]
        if dynamic:
            _mark_token_dim(inputs, self.model.rope)
        return self.compiled[self._kind(index)](fn, modules, inputs)

    @torch.inference_mode()
    def compile(self) -> float:
        """Compile each kind of piece now (any token count, and one token), not at the first step."""
        start = time.perf_counter()
        ids, rope = self.scratch_ids, self.model.rope
        indices = [0, 1, len(self.pieces) - 1] if len(self.pieces) > 2 else [0, 1]
        for n in ([self.max_num_tokens] if self.max_num_tokens > 1 else []) + [1]:
            dynamic = n > 1  # the first compile: the token count is a symbol from the start
            for index in indices:
                if self.piecewise:
                    self._run_piece_into(index, n, ids[:n], ids[:n], dynamic)
                kind = self._kind(index)
                inputs = ((ids[:n], ids[:n], rope) if kind == "first" else
                          (self.attn_out[:n], self.residual[:n], ids[:n], rope) if kind == "middle" else
                          (self.attn_out[:n], self.residual[:n]))
                self._run_piece(index, inputs, dynamic)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        # Every piece is compiled: inductor's compile workers (a process per core) would only hold
        # memory and compete with the step loop for the CPU. A later compile starts them again.
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
        elapsed = time.perf_counter() - start
        logger.info("torch.compile (inductor) of the model's pieces between attention calls: %.1fs", elapsed)
        return elapsed

    @torch.inference_mode()
    def capture(self, sizes: list[int], input_ids: torch.Tensor, positions: torch.Tensor, pool, stream,
                progress: bool) -> None:
        """One CUDA graph per piece and token count (largest first, in the shared pool `pool`).
        `input_ids` and `positions` are the persistent device buffers the steps fill."""
        from tqdm.auto import tqdm

        self.graph_input_ids, self.graph_positions = input_ids, positions
        with torch.cuda.stream(stream), no_gc():
            for size in tqdm(sorted(sizes, reverse=True), desc="Capturing piecewise CUDA graphs", unit="size",
                             disable=not progress):
                graphs = []
                for index in range(len(self.pieces)):
                    self._run_piece_into(index, size, input_ids[:size], positions[:size])  # warm up
                    with graph_capture(torch.cuda.CUDAGraph(), pool, stream) as graph:
                        self._run_piece_into(index, size, input_ids[:size], positions[:size])
                    graphs.append(graph)
                self.graphs[size] = graphs
        self.graph_sizes = sorted(self.graphs)

    def graph_size(self, input_ids: torch.Tensor) -> int | None:
        """The captured token count a batch is padded to, or None (no graph fits, or other buffers)."""
        if not self.graph_sizes or input_ids.data_ptr() != self.graph_input_ids.data_ptr():
            return None
        i = bisect.bisect_left(self.graph_sizes, input_ids.shape[0])
        return self.graph_sizes[i] if i < len(self.graph_sizes) else None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata, use_graphs: bool = True) -> torch.Tensor:
        """hidden [num_tokens, hidden_size]. From piecewise graphs it is a view of a persistent
        buffer, valid until the next forward."""
        size = self.graph_size(input_ids) if use_graphs else None
        if size is None:
            return self.forward(input_ids, positions, kv_caches, meta)
        self.graph_replays += 1
        return self.forward_in_buffers(self.graph_input_ids[:size], self.graph_positions[:size], kv_caches, meta,
                                       self.graphs[size])

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """The compiled pieces chained like the eager forward (new tensors between them)."""
        rope = self.model.rope
        q, k, v, residual = self._run_piece(0, (input_ids, positions, rope))
        for index, attention in enumerate(self.attention):
            attn_out = attention.attend(q, k, v, kv_caches[index], meta)
            if index + 1 < len(self.attention):
                q, k, v, residual = self._run_piece(index + 1, (attn_out, residual, positions, rope))
        return self._run_piece(len(self.pieces) - 1, (attn_out, residual))

    def forward_in_buffers(self, input_ids, positions, kv_caches, meta: AttentionMetadata,
                           graphs: list[torch.cuda.CUDAGraph] | None = None) -> torch.Tensor:
        """The pieces over all rows of `input_ids` (a batch padded to a graph size: replays of
        `graphs` where given), attention over the batch's own tokens only (padding writes no KV)."""
        size, n = input_ids.shape[0], meta.query_start_loc_host[-1]
        for index in range(len(self.pieces)):
            if graphs is not None:
                graphs[index].replay()
            else:
                self._run_piece_into(index, size, input_ids, positions)
            if index < len(self.attention):
                self.attention[index].attend(self.q[:n], self.k[:n], self.v[:n], kv_caches[index], meta,
                                             out=self.attn_out[:n])
        return self.hidden[:n]


def _mark_token_dim(tensors: tuple, rope: torch.Tensor) -> None:
    """Dim 0 (tokens) of every input but the rope cache is a symbol: one compile for every count."""
    for t in tensors:
        if t is not rope:
            torch._dynamo.mark_dynamic(t, 0)
