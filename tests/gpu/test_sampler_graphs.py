"""The sampler's CUDA graphs (Sampler(cuda_graphs=True)): a steady batch replays a graph of its
sampling and draws, step by step, the tokens the eager sampler draws, through a batch that
changes, penalty histories that outgrow their width bucket, and the engine's MetadataCache; a
replay never syncs with the host and never overwrites an earlier step's tokens."""

from __future__ import annotations

import pytest
import torch

from sampling.metadata import MetadataCache, SamplingRow
from sampling.params import SamplingParams
from sampling.sampler import Sampler
from tests.sampling.reference import random_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")

VOCAB = 151936
PROMPT = 250  # the repetition penalty reads the prompt: histories pass 256 tokens at step 7
PARAMS = [
    SamplingParams(temperature=0.8, top_k=50, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
                   repetition_penalty=1.1),
    SamplingParams(temperature=1.0, min_p=0.05, presence_penalty=1.0),
    SamplingParams(temperature=0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7, top_p=0.95),
    SamplingParams(temperature=0.9, logit_bias={11: 5.0, 12: -100.0}),
]


class Pipeline:
    """A runner's sampling: its Sampler, MetadataCache and requests' token lists."""

    def __init__(self, graphs: bool, batch: int) -> None:
        self.sampler, self.cache = Sampler(cuda_graphs=graphs), MetadataCache()
        gen = torch.Generator().manual_seed(9)
        self.lists = [torch.randint(0, VOCAB, (PROMPT,), generator=gen).tolist() for _ in range(batch)]
        self.live = list(range(batch))
        self.logits = torch.empty(batch, VOCAB, device="cuda")  # a FULL graph's logits: one place

    def sample(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        """The step's metadata through the cache, then the Sampler on the logits in their place."""
        rows = [SamplingRow(PARAMS[i % len(PARAMS)], 100 + i, step, token_ids=self.lists[i], num_prompt_tokens=PROMPT)
                for i in self.live]
        md = self.cache.build(rows, VOCAB, torch.device("cuda"), histories=self.sampler.histories)
        x = self.logits[: len(rows)]
        x.copy_(logits)
        return self.sampler(x, md).token_ids

    def step(self, step: int, logits: torch.Tensor) -> torch.Tensor:
        tokens = self.sample(step, logits)
        for i, t in zip(self.live, tokens.tolist()):
            self.lists[i].append(t)
        return tokens


def test_graphed_sampling_draws_what_the_eager_sampler_draws_step_by_step():
    batch, steps = 40, 16
    eager, graphed = Pipeline(False, batch), Pipeline(True, batch)
    held = []
    for step in range(steps):
        if step == 10:  # two requests finish: another layout, eager once, then captured again
            for p in (eager, graphed):
                p.live = [i for i in p.live if i not in (5, 17)]
        logits = random_logits(len(eager.live), VOCAB, seed=200 + step).cuda()
        want, got = eager.step(step, logits), graphed.step(step, logits)
        assert torch.equal(got, want), step
        held.append((got, got.cpu()))
    graphs = graphed.sampler.graphs
    # Full builds at steps 0, 7 (the histories outgrow their 256-token device buffer, the width its
    # bucket) and 10; reuses (penalized: their own layout) from 1, 8 and 11, captured the third
    # step in a row a layout comes: at 3 and 13 (8-9 is cut short by the change at 10), replayed on.
    assert graphs.captures == 2 and graphs.replays == 7
    assert eager.sampler.graphs is None and eager.cache.hits == graphed.cache.hits == steps - 3
    for tokens, at_the_time in held:  # each step's tensor still holds its own step's tokens
        assert torch.equal(tokens.cpu(), at_the_time)
    assert all(12 not in t[PROMPT:] for i, t in enumerate(graphed.lists) if i % len(PARAMS) == 4)


def test_a_replay_never_syncs_with_the_host():
    pipeline = Pipeline(True, 64)
    for step in range(5):  # eager (a full build, two reuses), captured, replayed
        pipeline.step(step, random_logits(64, VOCAB, seed=step).cuda())
    assert pipeline.sampler.graphs.replays == 2
    logits = random_logits(64, VOCAB, seed=5).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pipeline.sample(5, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert pipeline.sampler.graphs.replays == 3


def test_the_least_recently_used_graph_goes_past_the_limit():
    sampler, cache = Sampler(cuda_graphs=True, max_graphs=2), MetadataCache()
    params = SamplingParams(temperature=0.8, top_k=20)
    logits = torch.empty(8, VOCAB, device="cuda")
    for n in (2, 3, 4):  # three layouts, each steady for four steps
        for step in range(4):
            rows = [SamplingRow(params, i, step) for i in range(n)]
            x = logits[:n]
            x.copy_(random_logits(n, VOCAB, seed=step).cuda())
            sampler(x, cache.build(rows, VOCAB, torch.device("cuda")))
    graphs = sampler.graphs
    # Without penalties a reuse is laid out as its full build: eager at the full build and the
    # first reuse, captured at the second, replayed at the third.
    assert graphs.captures == 3 and graphs.replays == 6 and len(graphs.graphs) == 2
    assert [key[6][1][0] for key in graphs.graphs] == [3, 4]  # the logits' rows: n = 2 went


def test_a_batch_that_comes_back_replays_from_its_first_step_and_graphs_share_their_memory():
    """Requests finish and others take their seats: the batches of a decode run come back. Each
    layout's graph is captured once and replayed from the first step of its next visit (a full
    build and its reuses are laid out alike), draws equal the eager sampler's, and the graphs of
    33 layouts take about the memory of one (one pool, their scratch reused)."""
    sampler, cache = Sampler(cuda_graphs=True), MetadataCache()
    eager, eager_cache = Sampler(), MetadataCache()
    params = SamplingParams(temperature=0.8, top_k=20, min_p=0.01)
    logits = torch.empty(64, VOCAB, device="cuda")

    def visit(n: int, steps: int, seed: int) -> None:
        for step in range(steps):
            rows = [SamplingRow(params, i, seed + step) for i in range(n)]
            x = logits[:n]
            x.copy_(random_logits(n, VOCAB, seed=seed + step).cuda())
            want = eager(x.clone(), eager_cache.build(rows, VOCAB, torch.device("cuda"))).token_ids
            got = sampler(x, cache.build(rows, VOCAB, torch.device("cuda"))).token_ids
            assert torch.equal(got, want), (n, step)

    visit(64, 3, 0)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for n in range(63, 31, -1):
        visit(n, 3, n)
    graphs = sampler.graphs
    assert graphs.captures == 33 and graphs.replays == 33  # each layout: eager twice, then captured
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() - reserved < 64 << 20
    replays = graphs.replays
    visit(48, 3, 1000)  # back: replayed from its first step
    visit(64, 2, 2000)
    assert graphs.captures == 33 and graphs.replays == replays + 5


def compiled_kernels() -> int:
    """Triton kernels compiled so far by the sampler's modules (all variants, this device)."""
    from triton.runtime.jit import JITFunction

    import kernels.sampling
    import kernels.sampling_topk

    device = torch.cuda.current_device()
    jitted = {fn for module in (kernels.sampling, kernels.sampling_topk) for fn in vars(module).values()
              if isinstance(fn, JITFunction)}
    return sum(len(fn.device_caches[device][0]) for fn in jitted if device in fn.device_caches)


def test_a_shrinking_batch_compiles_no_kernel_after_the_first_sizes():
    """Requests finish one by one: each batch size lays the metadata out anew. Once a few sizes
    have run, no other size may compile a kernel (a compile holds the engine loop 50-200 ms): no
    integer that follows the rows is specialized on, and every metadata tensor is 16-byte aligned."""
    pipeline = Pipeline(False, 64)

    def run(sizes):
        for step, n in enumerate(sizes):
            pipeline.live = list(range(n))
            for again in range(2):  # a full build, then a reuse
                pipeline.step(2 * step + again, random_logits(n, VOCAB, seed=n + again).cuda())

    run([64, 63, 62, 61])
    compiled = compiled_kernels()
    assert compiled >= 5
    run([59, 58, 57, 54, 50, 45, 41, 33, 17])
    assert compiled_kernels() == compiled


def test_the_grammars_masking_replays_inside_the_graph_with_each_steps_mask():
    """BatchBitmask.upload() copies a step's rows and hands the masking over as a DeviceMask: a
    steady constrained batch replays it inside the sampler's graph, reading that step's mask (a
    new random one every step, rows 3..47 constrained) and draws what the eager sampler draws on
    logits masked by the reference; a replay does not sync."""
    from structured.bitmask import BatchBitmask, DeviceMask, apply_bitmask_reference

    batch, rows = 48, list(range(3, 48))
    words = (VOCAB + 31) // 32
    eager, graphed = Pipeline(False, batch), Pipeline(True, batch)
    bitmask = BatchBitmask(64, VOCAB, "cuda")
    bitmask.host = torch.zeros(64, words, dtype=torch.int32).pin_memory()
    gen = torch.Generator().manual_seed(5)
    for step in range(7):  # eager (a full build, two reuses), captured at 3, replayed on
        # About one token in 64 allowed: the draw must land on it.
        mask = torch.randint(-(2**31), 2**31, (64, words), generator=gen, dtype=torch.int64)
        for _ in range(5):
            mask &= torch.randint(-(2**31), 2**31, (64, words), generator=gen, dtype=torch.int64)
        bitmask.host.copy_(mask.to(torch.int32))
        bitmask._rows = rows
        logits = random_logits(batch, VOCAB, seed=300 + step).cuda()
        masked = logits.cpu()
        apply_bitmask_reference(masked, bitmask.host, rows)
        want = eager.step(step, masked.cuda())
        x = graphed.logits[:batch]
        x.copy_(logits)
        row_md = [SamplingRow(PARAMS[i % len(PARAMS)], 100 + i, step, token_ids=graphed.lists[i],
                              num_prompt_tokens=PROMPT) for i in graphed.live]
        md = graphed.cache.build(row_md, VOCAB, torch.device("cuda"), histories=graphed.sampler.histories)
        constrain = bitmask.upload(x)
        assert isinstance(constrain, DeviceMask)
        if step == 6:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = graphed.sampler(x, md, constrain).token_ids
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for i, t in zip(graphed.live, got.tolist()):
            graphed.lists[i].append(t)
        assert torch.equal(got, want), step
        allowed = (bitmask.host[rows, got[rows].cpu() // 32] >> (got[rows].cpu() % 32)) & 1
        assert allowed.all(), step
    graphs = graphed.sampler.graphs
    assert graphs.captures == 1 and graphs.replays == 4
    assert all(key[-1] is not None and key[-1][0] == "bitmask" for key in graphs.graphs)
