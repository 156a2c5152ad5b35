"""Every Triton kernel against its torch reference at realistic shapes on CUDA (bf16/fp16)."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul_reference, silu_and_mul_triton
from kernels.attention import AttentionMetadata, paged_attention_reference, paged_attention_triton
from kernels.cache import write_kv_reference, write_kv_triton
from kernels.gemv import gemv_triton
from kernels.layernorm import (
    fused_add_rms_norm_reference,
    fused_add_rms_norm_triton,
    rms_norm_reference,
    rms_norm_triton,
)
from kernels.rotary import (
    apply_rotary_reference,
    apply_rotary_triton,
    cos_sin_cache,
    llama3_inv_freq,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run tests/gpu on the GPU machine)")

HEADS = {"qwen3-0.6b": (16, 8, 128), "llama-3.1-8b": (32, 8, 128), "qwen2.5-0.5b": (14, 2, 64)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (NaN) elements"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_batch(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """seqs: (cached context, new tokens) per request; blocks shuffled across the cache."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = [-(-(c + q) // block_size) for c, q in seqs]
    num_blocks = sum(blocks_per_seq) + 7
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    width = max(blocks_per_seq)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = perm[used:used + n]
        used += n
    q_lens = [q for _, q in seqs]
    seq_lens = [c + q for c, q in seqs]
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device="cuda"),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables, max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=starts, seq_lens_host=seq_lens,
    )
    q = torch.randn(starts[-1], num_heads, head_dim, device="cuda", dtype=dtype, generator=gen)
    return q, kv, meta


BATCHES = {
    "decode_mixed_lengths": [(c, 1) for c in (1, 17, 300, 4095, 1000, 64, 2049, 5)],
    "decode_32k": [(32767, 1)],
    "decode_64x4k": [(4095, 1)] * 64,
    "prefill_fresh": [(0, 1024), (0, 77), (0, 300)],
    "prefill_chunks_with_prefix": [(2048, 512), (16, 33), (8000, 192)],
    "mixed_prefill_and_decode": [(0, 200), (1500, 1), (300, 64), (7, 1), (4096, 256), (99, 1)],
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("model", list(HEADS))
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_paged_attention_matches_reference_bf16(batch, model, block_size):
    num_heads, num_kv_heads, head_dim = HEADS[model]
    q, kv, meta = make_batch(BATCHES[batch], num_heads, num_kv_heads, head_dim, block_size, torch.bfloat16)
    ref = paged_attention_reference(q, kv, meta, head_dim**-0.5)
    out = torch.full_like(q, float("nan"))
    paged_attention_triton(q, kv, meta, head_dim**-0.5, out=out)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("splits, min_split", [(1, 128), (4, 128), (32, 128), (32, 32), (8, 1024)])
def test_split_k_decode_equals_single_pass(splits, min_split):
    q, kv, meta = make_batch([(c, 1) for c in (8191, 15, 100, 2000)], 32, 8, 128, 16, torch.float16, seed=3)
    ref = paged_attention_reference(q, kv, meta, 0.088)
    out = torch.full_like(q, float("nan"))
    paged_attention_triton(q, kv, meta, 0.088, out=out, num_splits=splits, min_split=min_split)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("num_seqs", [1, 8, 24, 64, 256])
def test_decode_plans_of_every_batch_shape_match_reference(num_seqs):
    """Each batch size's own plan (splits, 32- or 64-key tiles) on ragged contexts."""
    gen = torch.Generator().manual_seed(num_seqs)
    contexts = torch.randint(1, 3000, (num_seqs,), generator=gen).tolist()
    q, kv, meta = make_batch([(c, 1) for c in contexts], 16, 8, 128, 16, torch.bfloat16, seed=num_seqs)
    ref = paged_attention_reference(q, kv, meta, 0.088)
    out = torch.full_like(q, float("nan"))
    paged_attention_triton(q, kv, meta, 0.088, out=out)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("window", [1, 100, 4096])
def test_sliding_window_matches_reference(window):
    q, kv, meta = make_batch([(5000, 1), (0, 300), (1000, 129), (50, 1)], 16, 8, 128, 16, torch.bfloat16, seed=5)
    ref = paged_attention_reference(q, kv, meta, 0.1, window)
    out = torch.full_like(q, float("nan"))
    paged_attention_triton(q, kv, meta, 0.1, window, out=out)
    assert rel_err(out, ref) < 1e-2


def test_head_dim_256_and_fp32():
    q, kv, meta = make_batch([(100, 20), (30, 1)], 8, 2, 256, 16, torch.float32, seed=7)
    ref = paged_attention_reference(q, kv, meta, 0.0625)
    out = torch.full_like(q, float("nan"))
    paged_attention_triton(q, kv, meta, 0.0625, out=out)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_kv_by_slot(dtype):
    kv = torch.randn(2, 512, 16, 8, 128, device="cuda", dtype=dtype)
    expect = kv.clone()
    k = torch.randn(3000, 8, 128, device="cuda", dtype=dtype)
    v = torch.randn(3000, 8, 128, device="cuda", dtype=dtype)
    slots = torch.randperm(512 * 16, device="cuda")[:3000]
    slots[::7] = -1  # padding tokens are skipped
    write_kv_reference(k, v, expect, slots)
    write_kv_triton(k, v, kv, slots)
    assert torch.equal(kv, expect)


@pytest.mark.parametrize("hidden", [896, 1024, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norms_match_reference(hidden, dtype):
    x = torch.randn(3001, hidden, device="cuda", dtype=dtype)
    r = torch.randn_like(x)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    assert rel_err(rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)) < 1e-2
    out, res = fused_add_rms_norm_triton(x, r, w, 1e-6)
    ref_out, ref_res = fused_add_rms_norm_reference(x, r, w, 1e-6)
    assert torch.equal(res, ref_res)
    assert rel_err(out, ref_out) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_matches_reference(dtype):
    x = torch.randn(2049, 2 * 3072, device="cuda", dtype=dtype)
    assert rel_err(silu_and_mul_triton(x), silu_and_mul_reference(x)) < 1e-2


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", list(HEADS.values()))
def test_rotary_in_place_on_qkv_views_with_llama3_scaling(num_heads, num_kv_heads, head_dim):
    inv = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cache = cos_sin_cache(llama3_inv_freq(inv, 8.0, 1.0, 4.0, 8192), 32768).cuda()
    t = 4000
    qkv = torch.randn(t, (num_heads + 2 * num_kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : num_heads * head_dim].view(t, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim: (num_heads + num_kv_heads) * head_dim].view(t, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    pos = torch.randint(0, 32768, (t,), device="cuda")
    ref_q, ref_k = apply_rotary_reference(pos, q.clone(), k.clone(), cache)
    apply_rotary_triton(pos, q, k, cache)
    assert rel_err(q, ref_q) < 1e-2 and rel_err(k, ref_k) < 1e-2
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)  # v untouched


def test_paged_attention_replays_in_a_cuda_graph_with_new_metadata():
    """Captured once, replayed after the batch's lengths, block tables and cache changed in place."""
    q, kv, meta = make_batch([(2047, 1)] * 4, 16, 8, 128, 16, torch.bfloat16, seed=11)
    out = torch.empty_like(q)
    paged_attention_triton(q, kv, meta, 0.088, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_triton(q, kv, meta, 0.088, out=out)
    new_q, new_kv, new_meta = make_batch([(1500, 1), (30, 1), (2000, 1), (64, 1)], 16, 8, 128, 16, torch.bfloat16, seed=12)
    q.copy_(new_q)
    kv[:, : new_kv.shape[1]].copy_(new_kv)
    meta.seq_lens.copy_(new_meta.seq_lens)
    meta.block_tables.zero_()
    meta.block_tables[:, : new_meta.block_tables.shape[1]].copy_(new_meta.block_tables)
    out.fill_(float("nan"))
    graph.replay()
    ref = paged_attention_reference(new_q, new_kv, new_meta, 0.088)
    assert rel_err(out, ref) < 1e-2


# One-token matmuls at the models' shapes: (N, K) of qkv, o, gate_up, down and lm_head.
GEMV_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
               (4096, 1024), (1024, 2048), (1024, 3072), (151936, 1024), (1152, 896), (9728, 896), (896, 4864)]


@pytest.mark.parametrize("n, k", GEMV_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_matches_linear_at_model_shapes(n, k, dtype):
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", dtype=dtype, generator=gen)
    weight = (torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * 0.02)
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if n == 1152 else None  # qwen2's qkv bias
    out = gemv_triton(x, weight, bias)
    ref = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    assert rel_err(out, ref) < 1e-2
    # as close to the fp32 result as cuBLAS's own bf16/fp16 product is
    cublas = torch.nn.functional.linear(x, weight, bias)
    assert rel_err(out, ref) < 1.5 * rel_err(cublas, ref) + 1e-3


def test_gemv_replays_in_a_cuda_graph_with_new_inputs():
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)
    weight = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    out = torch.empty(1, 6144, device="cuda", dtype=torch.bfloat16)
    out.copy_(gemv_triton(x, weight))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(gemv_triton(x, weight))
    x.copy_(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16, generator=gen))
    weight.copy_(torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02)
    out.fill_(float("nan"))
    graph.replay()
    assert rel_err(out, torch.nn.functional.linear(x.float(), weight.float())) < 1e-2


def test_model_linears_take_the_gemv_for_one_token_eager_and_compiled(monkeypatch):
    """A one-token batch goes through the GEMV (eager, and as the custom op in a static one-token
    compile); more tokens and a symbolic token count (mark_dynamic: 2 and up) stay on cuBLAS."""
    import kernels.gemv
    from aio_engine.models import layers

    launches = []
    real = kernels.gemv.gemv_triton
    monkeypatch.setattr(kernels.gemv, "gemv_triton", lambda *a: launches.append(a[0].shape[0]) or real(*a))
    gen = torch.Generator(device="cuda").manual_seed(4)
    module = layers.Linear(1024, 3072, bias=False).to("cuda", torch.bfloat16)
    module.weight.data.copy_(torch.randn(3072, 1024, device="cuda", generator=gen) * 0.03)
    x = torch.randn(5, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = torch.nn.functional.linear(x.float(), module.weight.float())
    assert rel_err(module(x[:1]), ref[:1]) < 1e-2 and launches == [1]
    assert rel_err(module(x), ref) < 1e-2 and launches == [1]  # five tokens: cuBLAS
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.inference_mode():  # as the engine compiles and runs its pieces (the op has no backward)
        assert rel_err(compiled(x[:1].clone()), ref[:1]) < 1e-2 and launches == [1, 1]
        many = x.clone()
        torch._dynamo.mark_dynamic(many, 0)
        assert rel_err(compiled(many), ref) < 1e-2 and launches == [1, 1]


@pytest.mark.parametrize("rows", [1, 3, 256])
def test_logits_come_out_of_the_matmul_in_float32(rows):
    """No bf16 rounding of the logits: closer to the float32 product than bf16 logits are."""
    from aio_engine.models.layers import logits_linear

    gen = torch.Generator(device="cuda").manual_seed(rows)
    hidden = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16, generator=gen)
    head = torch.randn(151936, 1024, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.05
    out = logits_linear(hidden, head)
    ref = hidden.double() @ head.double().t()
    rounded = torch.nn.functional.linear(hidden, head).double()
    assert out.dtype == torch.float32 and out.shape == (rows, 151936)
    assert (out.double() - ref).abs().max() < 0.5 * (rounded - ref).abs().max()
