"""ModelRunner: turns a SchedulerOutput into a flat batch, runs the forward and the sampler.

Owns the model, the KV-cache tensors and the input buffers (allocated once at the largest batch;
pinned on CUDA, copied non-blocking). It never decides who runs: the scheduler does.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
import torch

from kernels.attention import AttentionMetadata
from sampling.metadata import MetadataCache, SamplingMetadata, SamplingRow
from sampling.params import SamplingParams
from sampling.sampler import Sampler, SamplerOutput

from .batch_inputs import BlockTables, DecodeInputs, StagingBuffer, kv_slots
from .compilation import PiecewiseForward, configure_caches, graph_capture, no_gc
from .config import EngineConfig
from .loader import load_model
from .scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        mc = config.model
        torch.manual_seed(mc.seed)
        # Before any kernel or graph is compiled.
        configure_caches(config)
        start = time.perf_counter()
        self.model = load_model(config)
        logger.info("loaded %s (%s, %s) in %.1fs", mc.path, mc.architecture, mc.dtype, time.perf_counter() - start)
        self.block_size = config.cache.block_size
        self.max_num_tokens = config.scheduler.max_num_batched_tokens
        self.max_num_seqs = config.scheduler.max_num_seqs
        self.max_blocks_per_seq = -(-mc.max_model_len // self.block_size)
        dev = self.device
        self.buf_input_ids = StagingBuffer(self.max_num_tokens, torch.int64, dev)
        self.buf_positions = StagingBuffer(self.max_num_tokens, torch.int64, dev)
        self.buf_slots = StagingBuffer(self.max_num_tokens, torch.int64, dev)
        self.buf_query_start = StagingBuffer(self.max_num_seqs + 1, torch.int32, dev)
        self.buf_seq_lens = StagingBuffer(self.max_num_seqs, torch.int32, dev)
        # Block tables are packed [num_seqs, widest table of the step] at the front of the buffer.
        self.buf_block_tables = StagingBuffer(self.max_num_seqs * self.max_blocks_per_seq, torch.int32, dev)
        self.buf_logits_idx = StagingBuffer(self.max_num_seqs, torch.int64, dev)
        self.buf_carry = StagingBuffer(2 * self.max_num_seqs, torch.int64, dev)  # carried rows: (dst, src) ids
        self.buffers = [self.buf_input_ids, self.buf_positions, self.buf_slots, self.buf_query_start,
                        self.buf_seq_lens, self.buf_block_tables, self.buf_logits_idx, self.buf_carry]
        self.block_tables = BlockTables(self.max_num_seqs, self.max_blocks_per_seq)
        self.buf_sampled = StagingBuffer(self.max_num_seqs, torch.int64, dev)  # host side: ids coming home
        # The forward and sampling run on their own stream; an event says when the ids are home.
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        # With CUDA graphs, a steady decode batch's sampling replays one too (see Sampler).
        self.sampler = Sampler(cuda_graphs=dev.type == "cuda" and config.compilation.cudagraph_mode != "NONE")
        self.sampling_metadata = MetadataCache()  # a decode step reuses the last step's, new keys only
        self._fill_started: LaunchedStep | None = None  # the step whose bitmask start_fill() began
        self.logprobs_mode = mc.logprobs_mode
        self.kv_caches: list[torch.Tensor] = []
        self.num_blocks = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # FULL decode graphs
        self.decode_inputs: DecodeInputs | None = None  # their inputs, made with them
        self.graph_sizes: list[int] = []
        self.graph_replays = 0
        # -O1 and up: the model compiled between attention calls (its piecewise graphs come later).
        self.pieces: PiecewiseForward | None = None
        if config.compilation.mode == "compile":
            self.pieces = PiecewiseForward(self.model, config.compilation, self.max_num_tokens, mc.dtype, dev)
            self.pieces.compile()

    # --- KV cache sizing ---
    def bytes_per_block(self) -> int:
        mc = self.config.model
        elem = torch.empty((), dtype=self.config.cache.kv_cache_dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_dim * elem

    def determine_num_blocks(self) -> int:
        cache = self.config.cache
        per_block = self.bytes_per_block()
        if cache.num_blocks_override is not None:
            return cache.num_blocks_override
        if cache.kv_cache_memory_bytes is not None:
            num = cache.kv_cache_memory_bytes // per_block
        elif self.device.type == "cuda":
            num = self._profile_free_bytes() // per_block
        else:
            # CPU: 1 GiB, but no more than every seat filled to max_model_len needs.
            enough = self.max_num_seqs * self.max_blocks_per_seq + 1
            num = min(CPU_DEFAULT_KV_BYTES // per_block, enough)
        if num < 1:
            raise ValueError(
                f"no memory is left for the KV cache ({per_block} bytes per block): raise "
                "--gpu-memory-utilization or --kv-cache-memory-bytes, or lower --max-num-batched-tokens"
            )
        return int(num)

    def _profile_free_bytes(self) -> int:
        """Run the largest batch once on a small scratch cache; what the budget leaves is for KV."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # The largest step: max_num_batched_tokens split into sequences no longer than max_model_len.
        num_tokens, seq_len = self.max_num_tokens, self.config.model.max_model_len
        lengths = [min(seq_len, num_tokens - start) for start in range(0, num_tokens, seq_len)][: self.max_num_seqs]
        seqs, next_block = [], 0
        for n in lengths:
            num_blocks = -(-n // self.block_size)
            seqs.append(([0] * n, 0, list(range(next_block, next_block + num_blocks))))
            next_block += num_blocks
        self.allocate_kv_cache(next_block)
        try:
            self._forward_raw(seqs, sample_rows=list(range(len(seqs))))
            # The sampler's worst case too: every seat sampling with top-k and top-p.
            vocab = self.config.model.vocab_size
            logits = torch.randn(self.max_num_seqs, vocab, device=self.device)
            worst = [SamplingRow(SamplingParams(temperature=1.0, top_p=0.9, logprobs=20), seed=i, step=0)
                     for i in range(self.max_num_seqs)]
            self.sampler(logits, SamplingMetadata.build(worst, vocab, self.device))
            del logits
            torch.cuda.synchronize()
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"out of memory in the profiling run at {num_tokens} tokens: lower --max-num-batched-tokens "
                "or --max-model-len, or raise --gpu-memory-utilization"
            ) from e
        peak = torch.cuda.max_memory_allocated()
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        budget = int(total * self.config.cache.gpu_memory_utilization)
        used_by_others = total - free - torch.cuda.memory_reserved()
        available = budget - peak - max(used_by_others, 0)
        logger.info("GPU memory: total %.1f GiB, peak %.2f GiB in profiling, %.2f GiB for the KV cache",
                    total / 2**30, peak / 2**30, available / 2**30)
        return max(available, 0)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.config.model
        shape = (2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim)
        dtype = self.config.cache.kv_cache_dtype
        try:
            self.kv_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(mc.num_layers)]
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # the compute stream must see the zeroed cache
        except torch.OutOfMemoryError as e:
            self.kv_caches = []
            raise RuntimeError(
                f"out of memory allocating {num_blocks} KV blocks: lower --gpu-memory-utilization, "
                "--kv-cache-memory-bytes or --num-gpu-blocks-override"
            ) from e
        self.num_blocks = num_blocks

    # --- the step ---
    def _build_batch(self, seqs: list[tuple[list[int], int, list[int]]], sample_rows: list[int],
                     table_rows: np.ndarray | None = None):
        """seqs: (token ids to compute, first position, block ids) per request -> device inputs.
        `table_rows`: the requests' rows in self.block_tables (the block ids in `seqs` are then
        not read). FULL decode graphs take theirs from DecodeInputs instead."""
        num_seqs = len(seqs)
        lens = np.fromiter(map(len, map(_first, seqs)), dtype=np.int64, count=num_seqs)
        starts = np.fromiter(map(_second, seqs), dtype=np.int64, count=num_seqs)
        num_tokens = int(lens.sum())
        query_start = self.buf_query_start.np[: num_seqs + 1]
        query_start[0] = 0
        np.cumsum(lens, out=query_start[1:])
        input_ids = self.buf_input_ids.np[:num_tokens]
        if num_tokens == num_seqs:  # decode rows only: one token each
            input_ids[:] = np.fromiter((t[0] for t, _, _ in seqs), dtype=np.int64, count=num_seqs)
        else:
            input_ids[:] = np.fromiter((tok for t, _, _ in seqs for tok in t), dtype=np.int64, count=num_tokens)
        # positions: each request's run start..start+len, built without a Python loop over tokens
        positions = self.buf_positions.np[:num_tokens]
        if num_tokens == num_seqs:
            seq_of_token = np.arange(num_seqs)
            positions[:] = starts
        else:
            seq_of_token = np.repeat(np.arange(num_seqs), lens)
            positions[:] = np.arange(num_tokens) - np.repeat(query_start[:-1], lens) + starts[seq_of_token]
        if table_rows is None:
            table_rows = self._table_rows_of(seqs)
        width = max(1, int(self.block_tables.count[table_rows].max()))
        tables = self.buf_block_tables.np[: num_seqs * width].reshape(num_seqs, width)
        np.take(self.block_tables.table[:, :width], table_rows, axis=0, out=tables)
        slots = self.buf_slots.np[:num_tokens]
        slots[:] = kv_slots(tables, seq_of_token, positions, self.block_size)
        seq_lens = self.buf_seq_lens.np[:num_seqs]
        seq_lens[:] = starts + lens
        self.buf_logits_idx.np[: len(sample_rows)] = query_start[1:][sample_rows] - 1

        meta = AttentionMetadata(
            slot_mapping=self.buf_slots.upload(num_tokens),
            query_start_loc=self.buf_query_start.upload(num_seqs + 1),
            seq_lens=self.buf_seq_lens.upload(num_seqs),
            block_tables=self.buf_block_tables.upload(num_seqs * width).view(num_seqs, width),
            max_query_len=int(lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_host=query_start.tolist(),
            seq_lens_host=seq_lens.tolist(),
        )
        return (self.buf_input_ids.upload(num_tokens), self.buf_positions.upload(num_tokens), meta,
                self.buf_logits_idx.upload(len(sample_rows)))

    def _table_rows_of(self, seqs) -> np.ndarray:
        """Rows for block lists that belong to no request (profiling, tests): written fresh."""
        ids = [f"_seq{i}" for i in range(len(seqs))]
        return self.block_tables.rows(ids, [list(b) for _, _, b in seqs])

    # --- CUDA graphs ---
    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """PIECEWISE graphs of the compiled pieces per token count (mixed and prefill batches), then
        FULL graphs of the whole forward (attention inside) for uniform decode batches, per capture
        size up to the first that seats max_num_seqs rows. The FULL graphs' inputs live in DecodeInputs (fixed addresses and strides), so a
        replay only needs those refilled. Largest first, all in one memory pool.
        """
        compilation = self.config.compilation
        sizes = compilation.cudagraph_capture_sizes
        if not sizes or self.device.type != "cuda":
            return
        if compilation.piecewise_graphs and self.pieces is None:
            logger.warning("cudagraph_mode %s: piecewise graphs need the compiled pieces (mode compile, here %s); "
                           "prefill and mixed batches run eagerly", compilation.cudagraph_mode, compilation.mode)
        pool = torch.cuda.graph_pool_handle()
        progress = self.config.load.use_tqdm
        if compilation.piecewise_graphs and self.pieces is not None:
            start = time.perf_counter()
            self.pieces.capture(sizes, self.buf_input_ids.device, self.buf_positions.device, pool, self.stream,
                                progress)
            torch.cuda.synchronize()
            logger.info("captured %d piecewise CUDA graphs (%d pieces x %d token counts, %d..%d) in %.1fs",
                        len(sizes) * len(self.pieces.pieces), len(self.pieces.pieces), len(sizes), min(sizes),
                        max(sizes), time.perf_counter() - start)
        if compilation.full_decode_graphs:
            self._capture_full_graphs(compilation.full_capture_sizes, pool, progress)

    def _capture_full_graphs(self, sizes: list[int], pool, progress: bool) -> None:
        start = time.perf_counter()
        self.decode_inputs = DecodeInputs(max(sizes), self.max_blocks_per_seq, self.device)
        torch.cuda.synchronize()  # made on the default stream: ready before the capture stream uses it
        from tqdm.auto import tqdm

        with torch.cuda.stream(self.stream), no_gc():
            for size in tqdm(sorted(sizes, reverse=True), desc="Capturing CUDA graphs", unit="graph",
                             disable=not progress):
                input_ids, positions, meta = self._graph_inputs([], size, np.zeros(0, dtype=np.int64))
                for _ in range(2):  # warm up: Triton compiles, the allocator settles
                    self.model.compute_logits(self._model_forward(input_ids, positions, meta, use_graphs=False))
                with graph_capture(torch.cuda.CUDAGraph(), pool, self.stream) as graph:
                    hidden = self._model_forward(input_ids, positions, meta, use_graphs=False)
                    logits = self.model.compute_logits(hidden)
                self.graphs[size] = (graph, logits)
        self.graph_sizes = sorted(self.graphs)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch %d..%d) in %.1fs", len(sizes), min(sizes), max(sizes),
                    time.perf_counter() - start)

    def _graph_inputs(self, seqs, size: int, table_rows: np.ndarray):
        """Fill the FULL graphs' persistent inputs for a decode batch padded to `size` rows."""
        input_ids, positions, slots, query_start, seq_lens, tables, lens = self.decode_inputs.build(
            seqs, size, table_rows, self.block_tables, self.block_size)
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=query_start, seq_lens=seq_lens, block_tables=tables,
            max_query_len=1, max_seq_len=int(lens.max()),
            query_start_loc_host=self.decode_inputs.query_start_host[: size + 1], seq_lens_host=lens.tolist(),
        )
        return input_ids, positions, meta

    def _graph_size(self, seqs) -> int | None:
        """The FULL graph's batch size a uniform decode batch is padded to, or None."""
        if not self.graphs or sum(map(len, map(_first, seqs))) != len(seqs):  # every row one token?
            return None
        i = bisect.bisect_left(self.graph_sizes, len(seqs))
        return self.graph_sizes[i] if i < len(self.graph_sizes) else None

    def _model_forward(self, input_ids, positions, meta, use_graphs: bool = True) -> torch.Tensor:
        """hidden [num_tokens, hidden]: the compiled pieces (their piecewise graphs where one fits)
        with attention between them, or the eager model."""
        if self.pieces is not None:
            return self.pieces(input_ids, positions, self.kv_caches, meta, use_graphs)
        return self.model(input_ids, positions, self.kv_caches, meta)

    @torch.inference_mode()
    def _forward_raw(self, seqs, sample_rows: list[int]):
        """Forward of a flat batch of block lists that belong to no request (the profiling run):
        (hidden [num_tokens, hidden], logits of the sample rows, metadata). Uniform decode batches
        replay a FULL CUDA graph instead (hidden is then None). Compiled, hidden is a view of the
        pieces' buffer: read it (enqueue its use) before the next forward."""
        return self._forward_inputs(self._stage_inputs(seqs, sample_rows, self._table_rows_of(seqs)))

    def _stage_inputs(self, seqs, sample_rows: list[int], table_rows: np.ndarray) -> StagedInputs:
        """The forward's device inputs, built on the host and uploaded (non-blocking copies)."""
        size = self._graph_size(seqs)
        if size is not None and len(sample_rows) == len(seqs):
            input_ids, _, meta = self._graph_inputs(seqs, size, table_rows)
            return StagedInputs(len(seqs), input_ids, None, meta, None, size)
        input_ids, positions, meta, logits_idx = self._build_batch(seqs, sample_rows, table_rows=table_rows)
        return StagedInputs(len(seqs), input_ids, positions, meta, logits_idx)

    def _forward_inputs(self, inputs: StagedInputs, fill=None):
        """_forward_raw on staged inputs; `fill` writes carried tokens into the input ids first."""
        meta = inputs.meta
        if fill is not None:
            fill(inputs.input_ids, meta.query_start_loc_host)
        if inputs.graph_size is not None:
            graph, logits = self.graphs[inputs.graph_size]
            graph.replay()
            self.graph_replays += 1
            return None, logits[: inputs.num_seqs], meta
        hidden = self._model_forward(inputs.input_ids, inputs.positions, meta)
        return hidden, self.model.compute_logits(hidden[inputs.logits_idx]), meta  # logits [len(sample_rows), vocab]

    def launch(self, out: SchedulerOutput, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Enqueue one step (forward, sampling, copy of the ids home) and return without waiting:
        stage() then enqueue(); see those."""
        return self.enqueue(self.stage(out, prev))

    @torch.inference_mode()
    def stage(self, out: SchedulerOutput, prev: LaunchedStep | None = None) -> StagedStep:
        """The host half of a launch: the step's inputs built and uploaded (non-blocking copies
        from pinned memory; nothing waits), the rows to sample and to carry decided.

        A request whose previous token is still on the GPU (async scheduling) takes it from
        `prev`'s sampled ids on the device, at enqueue(). While `prev` is in flight, the host state
        some rows sample from (grammar matchers, output ids for penalties, the count for
        min_tokens, the last tokens for bad words) is a token behind: then enqueue() queues only
        the forward, and the step comes back `needs_sampling`, for `sample()` once `prev` is
        finished on the host. `prev` may itself still wait for its sample(): it must have been
        sampled before enqueue() (this step's forward feeds on its ids), not before stage(), so
        the engine stages a step first and then queues `prev`'s late sampling and this forward
        back to back.
        """
        for buf in self.buffers:
            buf.flip()
        self.buf_sampled.flip()
        seqs = []
        request_ids: list[str] = []
        sample_rows: list[int] = []
        counters: list[int] = []  # per sampling row: tokens before this one, the random stream's counter
        prompt_spans: list[tuple[int, int, int]] = []  # (row, first, last): positions whose next token is known
        carried: list[tuple[int, int]] = []  # (row, row of its sampled token in `prev`)
        reads_host = False  # a sampling row depends on the tokens its request has so far
        prev_rows = prev.sample_row if prev is not None else {}
        for i, sched in enumerate(out.scheduled):
            r = sched.request
            start, num_new = sched.start, sched.num_new_tokens
            if start + num_new > r.num_tokens:  # the last input is the token `prev` sampled
                tokens = r.all_token_ids[start:] + [0]
                carried.append((i, prev_rows[r.request_id]))
            else:
                tokens = r.all_token_ids[start : start + num_new]
            seqs.append((tokens, start, r.block_ids))
            request_ids.append(r.request_id)
            if sched.samples:
                sample_rows.append(i)
                # Counts the pending token too: the same number before and after `prev` is finished.
                counters.append(r.num_output_tokens + r.num_pending - 1)
                reads_host = reads_host or _samples_from_its_tokens(r)
            if r.sampling_params.prompt_logprobs is not None:
                # A preempted request recomputes its prompt: positions it already has are skipped.
                first = max(start, len(r.prompt_logprobs))
                last = min(start + num_new, r.num_prompt_tokens - 1)
                if last > first:
                    prompt_spans.append((i, first, last))
        step = LaunchedStep(num_rows=len(seqs), sample_rows=sample_rows, counters=counters,
                            sample_row={request_ids[row]: j for j, row in enumerate(sample_rows)},
                            host_ids=self.buf_sampled.host[: len(sample_rows)])
        staged = StagedStep(out, step, prev, carried, prompt_spans,
                            late=bool(sample_rows) and prev is not None and reads_host)
        if seqs:
            table_rows = self.block_tables.rows(request_ids, [b for _, _, b in seqs])
            with self._on_stream():
                staged.inputs = self._stage_inputs(seqs, sample_rows, table_rows)
        return staged

    @torch.inference_mode()
    def enqueue(self, staged: StagedStep) -> LaunchedStep:
        """The GPU half of a launch: carried tokens copied in from `prev`'s sampled ids, the
        forward, and the sampling unless it is late (then the step `needs_sampling`)."""
        step, out = staged.step, staged.out
        if staged.inputs is None:
            return step
        with self._on_stream():
            fill = self._carry_tokens(staged.carried, staged.prev) if staged.carried else None
            hidden, logits, meta = self._forward_inputs(staged.inputs, fill)
            if staged.prompt_spans:
                step.prompt_logprobs = self._prompt_logprobs(hidden, meta, staged.prompt_spans, out)
            if staged.late:
                step.logits = logits  # [len(sample_rows), vocab]: sampled by sample(), after `prev`
            elif step.sample_rows:
                self._enqueue_sampling(out, step, logits)
            self._record_done(step)
        return step

    @torch.inference_mode()
    def sample(self, out: SchedulerOutput, step: LaunchedStep) -> None:
        """Enqueue the sampling that enqueue() left to later, from the requests' state now: call it
        once the step that was in flight is finished on the host (its tokens appended, its
        grammars advanced), before the next step's enqueue() (which feeds on this step's ids; its
        stage() may come first). The bitmask (start_fill()) is filled on the host while the GPU
        still runs this step's forward."""
        logits, step.logits = step.logits, None
        with self._on_stream():
            self._enqueue_sampling(out, step, logits)
            self._record_done(step)

    @torch.inference_mode()  # as every other use of the bitmask's host buffer
    def start_fill(self, out: SchedulerOutput, step: LaunchedStep, accept=None) -> bool:
        """Begin the bitmask fill of a step that sample() will sample, from the grammars' state
        now, in the bitmask's worker thread: the engine calls it as soon as the step before is
        home, so that the fill runs while the host finishes that step. `accept`: that step's
        (grammars, tokens), for the worker to accept first (BatchBitmask.start_fill). Returns
        whether it took them: then the caller gets accept_batch's answer from
        `self.bitmask.accepted()`; else (no row to fill) the caller accepts them itself."""
        picked = [(grammar, j) for j, i in enumerate(step.sample_rows)
                  if (grammar := out.scheduled[i].request.live_grammar) is not None]
        if not picked:
            return False
        grammars, rows = zip(*picked)
        self.bitmask.start_fill(grammars, rows, accept=accept)
        self._fill_started = step
        return accept is not None

    def _enqueue_sampling(self, out: SchedulerOutput, step: LaunchedStep, logits: torch.Tensor) -> None:
        """Rows from the requests' state, the constrained rows' bitmask, the sampler, the ids' copy home."""
        prefilled, self._fill_started = self._fill_started is step, None
        if not prefilled and "bitmask" in vars(self):  # made on first use
            # A fill an interrupted step left may be running: it ends before the rows are built.
            self.bitmask.finish_fill()
        # This step's own fill (start_fill()) runs on while the rows and their metadata are built:
        # it ends before the bitmask's upload, or before a matcher is asked is_completed (min_tokens).
        rows: list[SamplingRow] = []
        grammars, grammar_rows = [], []  # constrained sequences and their sampling rows, to fill here
        scheduled = out.scheduled
        for j, (i, counter) in enumerate(zip(step.sample_rows, step.counters)):
            r = scheduled[i].request
            row = r.sampling_row
            if row is None:  # one per request, kept: its params, seed and token list never change
                row = r.sampling_row = SamplingRow(r.sampling_params, r.seed, 0, token_ids=r.all_token_ids,
                                                   num_prompt_tokens=r.num_prompt_tokens)
            row.step = counter
            if r.status.finished:
                # Finished while this step was in flight (stop, grammar end, abort): its token will be
                # dropped, and its grammar (terminated, or no longer fed) is left alone.
                row.banned_ids = ()
            else:
                if r.grammar is not None:
                    if not prefilled:  # filled below
                        grammars.append(r.grammar)
                        grammar_rows.append(j)
                    elif r.num_output_tokens < r.sampling_params.min_tokens:
                        self.bitmask.finish_fill()  # banned_token_ids() asks the matcher
                row.banned_ids = r.banned_token_ids()
            rows.append(row)
        step.logprobs_wanted = [r.params.logprobs for r in rows]
        md = self.sampling_metadata.build(rows, logits.shape[-1], self.device, self.logprobs_mode,
                                          getattr(self.sampler, "histories", None))  # tests may stand in for the Sampler
        constrain = None
        if prefilled:  # rows finished since it began are masked too: their tokens are dropped
            constrain = self.bitmask.upload(logits, self.stream)
        elif grammars:  # filled on the host while the GPU runs the forward
            self.bitmask.fill(grammars, grammar_rows)
            constrain = self.bitmask.upload(logits, self.stream)
        step.sampled = self.sampler(logits, md, constrain)
        if self.stream is None:  # CPU: the ids are already home
            step.host_ids = step.sampled.token_ids
        else:  # the half of buf_sampled chosen at stage()
            step.host_ids.copy_(step.sampled.token_ids, non_blocking=True)

    def _on_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        if torch._C._cuda_getDevice() != self.stream.device_index:
            return torch.cuda.stream(self.stream)
        return _OnStream(self.stream)

    def _record_done(self, step: LaunchedStep) -> None:
        """Mark the end of what is queued for the step so far: wait() synchronizes on it."""
        if self.stream is not None:
            step.done = torch.cuda.Event()
            step.done.record(self.stream)  # (called on it; named, as finding the current one costs ~10 us)

    @functools.cached_property
    def bitmask(self):
        """The token bitmask of a step's constrained rows (made on first use: xgrammar loads slowly)."""
        from structured.bitmask import BatchBitmask

        return BatchBitmask(self.max_num_seqs, self.config.model.vocab_size, self.device,
                            fill_threads=self.config.structured_outputs.fill_threads)

    def _carry_tokens(self, carried, prev: LaunchedStep):
        """A function that writes `prev`'s sampled ids into this step's device input ids, given the
        batch's query start offsets (the last input of a carried row is its sampled token)."""
        if prev.sampled is None:
            raise RuntimeError("the step in flight was never sampled: sample() it before the next enqueue()")
        tokens = prev.sampled.token_ids
        rows = np.array(carried, dtype=np.int64).reshape(-1, 2)  # (row here, row in prev)
        n = len(rows)

        def fill(input_ids: torch.Tensor, query_start: list[int]) -> None:
            # Usually every row is a decode carried from the same row of `prev`: one plain copy.
            if query_start[n] == n and (rows[:, 0] == rows[:, 1]).all() and (rows[:, 0] == np.arange(n)).all():
                input_ids[:n].copy_(tokens[:n])
                return
            index = self.buf_carry.np[: 2 * n].reshape(2, n)
            index[0] = np.asarray(query_start, dtype=np.int64)[rows[:, 0] + 1] - 1
            index[1] = rows[:, 1]
            dst, src = self.buf_carry.upload(2 * n).view(2, n)
            input_ids.index_copy_(0, dst, tokens.index_select(0, src))

        return fill

    def is_done(self, step: LaunchedStep) -> bool:
        """Whether wait(step) would return without blocking (all its GPU work has run)."""
        return step.done is None or step.done.query()

    def wait(self, step: LaunchedStep) -> StepResult:
        """Block until the step is done (call from a worker thread) and read its results."""
        result = StepResult([None] * step.num_rows)
        if step.done is not None:
            step.done.synchronize()  # the step's one host sync
        if step.prompt_logprobs is not None:
            result.prompt_logprobs = step.prompt_logprobs()
        if step.sampled is None:
            return result
        for row, token in zip(step.sample_rows, step.host_ids.tolist()):
            result.tokens[row] = token
        sampled = step.sampled
        if sampled.logprob_ids is not None:
            ids, values, ranks = sampled.logprob_ids.tolist(), sampled.logprob_values.tolist(), sampled.sampled_rank.tolist()
            result.logprobs = [None] * step.num_rows
            for j, row in enumerate(step.sample_rows):
                n = step.logprobs_wanted[j]
                if n is not None:
                    keep = 1 + (len(ids[j]) - 1 if n == -1 else n)
                    result.logprobs[row] = (ids[j][:keep], values[j][:keep], ranks[j])
        return result

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Launch one step and wait for it."""
        step = self.launch(out)
        if step.needs_sampling:
            self.sample(out, step)
        return self.wait(step)

    def _prompt_logprobs(self, hidden, meta, spans, out: SchedulerOutput):
        """Logprobs of each prompt token given the ones before it, for the requests that ask.
        Returns a thunk to call after the step's sync: {row: [(ids, values, rank), ...]}."""
        starts = meta.query_start_loc_host
        index, targets, owners = [], [], []
        for row, first, last in spans:
            request = out.scheduled[row].request
            offset = starts[row] - out.scheduled[row].start
            index.extend(range(offset + first, offset + last))
            targets.extend(request.prompt_token_ids[first + 1 : last + 1])
            owners.append((row, last - first, request.sampling_params.prompt_logprobs))
        logprobs = self.model.compute_logits(hidden[torch.tensor(index, device=self.device)]).log_softmax(dim=-1)
        target = torch.tensor(targets, device=self.device)[:, None]
        chosen = logprobs.gather(1, target)
        top_n = max(n if n != -1 else logprobs.shape[1] for _, _, n in owners)
        top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (chosen[:, :0], target[:, :0])
        ranks = (logprobs > chosen).sum(dim=-1) + 1

        def collect() -> dict[int, list]:
            ids = torch.cat([target, top_ids], dim=1).tolist()
            values = torch.cat([chosen, top_values], dim=1).tolist()
            rank_list = ranks.tolist()
            result, k = {}, 0
            for row, count, n in owners:
                keep = 1 + (top_n if n == -1 else n)
                result[row] = [(ids[k + j][:keep], values[k + j][:keep], rank_list[k + j]) for j in range(count)]
                k += count
            return result

        return collect


_first, _second = itemgetter(0), itemgetter(1)


class _OnStream:
    """torch.cuda.stream(stream) for a stream of the current device, without its lookups: each
    use of that context asks for the current device and stream by way of torch.cuda.is_available()
    (an environment read among them), ~10 us, and the runner enters it three times a step."""

    __slots__ = ("stream", "prev")

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.stream = stream

    def __enter__(self) -> None:
        s = self.stream
        self.prev = torch._C._cuda_getCurrentStream(s.device_index)  # (stream id, device index, device type)
        torch._C._cuda_setStream(stream_id=s.stream_id, device_index=s.device_index, device_type=s.device_type)

    def __exit__(self, *exc) -> None:
        stream_id, device_index, device_type = self.prev
        torch._C._cuda_setStream(stream_id=stream_id, device_index=device_index, device_type=device_type)


def _samples_from_its_tokens(request) -> bool:
    """Does the request's next draw depend on the tokens it has so far (which the host must have)?"""
    p = request.sampling_params
    return (request.grammar is not None or bool(request.bad_words_ids) or request.num_output_tokens < p.min_tokens
            or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0)


@dataclass
class LaunchedStep:
    """A step on its way through the GPU: what sample() and wait() need."""

    num_rows: int
    sample_rows: list[int]
    sample_row: dict[str, int]  # request id -> row in `sampled`, for the next step's carried inputs
    counters: list[int]  # per sampling row: the random stream's counter
    logprobs_wanted: list[int | None] = field(default_factory=list)
    logits: torch.Tensor | None = None  # [len(sample_rows), vocab] while the sampling waits for sample()
    sampled: SamplerOutput | None = None
    host_ids: torch.Tensor | None = None
    prompt_logprobs: Callable[[], dict[int, list]] | None = None
    done: torch.cuda.Event | None = None

    @property
    def needs_sampling(self) -> bool:
        """enqueue() queued the forward only: sample() must follow once the step before is finished."""
        return self.logits is not None


@dataclass
class StagedInputs:
    """A step's device inputs, uploaded by stage(); a FULL graph's size when one replays them."""

    num_seqs: int
    input_ids: torch.Tensor
    positions: torch.Tensor | None
    meta: AttentionMetadata
    logits_idx: torch.Tensor | None
    graph_size: int | None = None


@dataclass
class StagedStep:
    """What stage() decided and built, for enqueue()."""

    out: SchedulerOutput
    step: LaunchedStep
    prev: LaunchedStep | None
    carried: list[tuple[int, int]]
    prompt_spans: list[tuple[int, int, int]]
    late: bool  # the sampling waits for sample(), once `prev` is finished on the host
    inputs: StagedInputs | None = None


@dataclass
class StepResult:
    tokens: list[int | None]  # per scheduled request
    logprobs: list | None = None  # per scheduled request: (ids, values, sampled rank) or None
    prompt_logprobs: dict[int, list] | None = None  # scheduled index -> one entry per prompt position
