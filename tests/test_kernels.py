"""Each Triton kernel against its plain-torch reference (and float64 truth) on random inputs.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before any
Triton kernel is defined) at small sizes; `pytest -m gpu` runs the same checks on CUDA at larger ones.
Error bounds follow the device method notes: ||out - ref|| / ||ref|| well under 1e-2 for bf16 operands,
under 2e-3 for fp16. Inputs are random and never zero; unused cache blocks are poisoned with NaN, so a
kernel that reads outside a sequence's blocks fails loudly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import DEVICES, TOL, operands, randn, rel_err, truth  # noqa: E402

from parity.kernels import reference
from parity.kernels.metadata import AttentionMetadata
from parity.kernels.triton import attention as ta
from parity.kernels.triton import elementwise as te
from parity.kernels.triton import norm as tn
from parity.kernels.triton import sampling as ts

DTYPES = [torch.float16, torch.bfloat16]
ATTENTION_DTYPES = DTYPES + [torch.float32]  # fp32 models: full-precision dots, not tf32


def same_rounding_tol(dtype, device) -> float:
    """On CUDA the pointwise kernels round each intermediate like torch does, so they sit far closer to
    the same-dtype reference than to float64. The interpreter rounds float32 -> bf16 by truncation."""
    return TOL[dtype] / 4 if device == "cuda" else TOL[dtype]


# ------------------------------------------------------------------------------------------ pointwise
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(device, dtype):
    gen = torch.Generator().manual_seed(1)
    rows, hidden = (37, 96) if device == "cpu" else (1000, 1024)
    x = randn(rows, hidden, dtype=dtype, device=device, gen=gen)
    res = randn(rows, hidden, dtype=dtype, device=device, gen=gen)
    w = (1 + 0.3 * randn(hidden, dtype=torch.float32, device=device, gen=gen)).to(dtype)
    out = tn.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, reference.rms_norm(x.double(), w.double(), 1e-6)) < TOL[dtype]
    assert rel_err(out, reference.rms_norm(x, w, 1e-6)) < same_rounding_tol(dtype, device)
    out, summed = tn.rms_norm(x, w, 1e-6, res)
    ref_out, ref_sum = reference.rms_norm(x.double(), w.double(), 1e-6, res.double())
    assert rel_err(summed, ref_sum) < TOL[dtype] and rel_err(out, ref_out) < TOL[dtype]
    if device == "cuda":
        assert torch.equal(summed, x + res)  # one rounding of the fp32 sum, like torch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_on_strided_heads(device, dtype):
    """Qwen3's per-head q/k norm runs on a strided view of the fused qkv output."""
    gen = torch.Generator().manual_seed(2)
    tokens, heads, head_dim = (9, 4, 64) if device == "cpu" else (300, 16, 128)
    qkv = randn(tokens, heads * head_dim * 2, dtype=dtype, device=device, gen=gen)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    assert not q.is_contiguous()
    w = (1 + 0.3 * randn(head_dim, dtype=torch.float32, device=device, gen=gen)).to(dtype)
    out = tn.rms_norm(q, w, 1e-6)
    assert rel_err(out, reference.rms_norm(q.double(), w.double(), 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(3)
    tokens, heads, kv_heads, head_dim = (7, 4, 2, 64) if device == "cpu" else (500, 16, 8, 128)
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, gen=gen)
    q = qkv[:, : heads * head_dim].reshape(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 100
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    q_out, k_out = te.apply_rotary(q, k, cos, sin)
    q_ref, k_ref = reference.apply_rotary(q.double(), k.double(), cos.double(), sin.double())
    assert rel_err(q_out, q_ref) < TOL[dtype] and rel_err(k_out, k_ref) < TOL[dtype]
    q_same, k_same = reference.apply_rotary(q, k, cos, sin)
    assert max(rel_err(q_out, q_same), rel_err(k_out, k_same)) < same_rounding_tol(dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False])
def test_rope_and_cache_fused_matches_reference(device, dtype, qk_norm):
    """One kernel for Qwen3's per-head q/k norm, RoPE and the cache write (strided q/k/v views of the fused
    projection, a padding slot -1) against the reference doing the three steps in float64 and in the same dtype."""
    gen = torch.Generator().manual_seed(12)
    tokens, heads, kv_heads, head_dim, blocks, block_size = (6, 4, 2, 32, 4, 4) if device == "cpu" else \
        (300, 16, 8, 128, 64, 16)
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, gen=gen)
    q, k, v = (t.reshape(tokens, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                    kv_heads * head_dim], dim=-1))
    angles = torch.rand(tokens, head_dim // 2, generator=gen) * 100
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    weights = [(1 + 0.2 * randn(head_dim, dtype=torch.float32, device="cpu", gen=gen)).to(device, dtype)
               for _ in range(2)] if qk_norm else [None, None]
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    slots[1] = -1
    slots = slots.to(device)
    poison = randn(blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    caches = {name: (poison.clone(), poison.clone()) for name in ("fused", "same", "f64")}
    q_out, k_out = te.rope_and_cache(q, k, v, cos, sin, *weights, 1e-6, caches["fused"], slots)
    q_same, k_same = reference.rope_and_cache(q, k, v, cos, sin, *weights, 1e-6, caches["same"], slots)
    w64 = [None if w is None else w.double() for w in weights]
    f64 = tuple(c.double() for c in caches["f64"])
    q_ref, k_ref = reference.rope_and_cache(q.double(), k.double(), v.double(), cos.double(), sin.double(), *w64,
                                            1e-6, f64, slots)
    chained = 2 if qk_norm else 1  # two rounded ops (norm, then RoPE) against float64
    assert max(rel_err(q_out, q_ref), rel_err(k_out, k_ref)) < chained * TOL[dtype]
    assert max(rel_err(q_out, q_same), rel_err(k_out, k_same)) < chained * same_rounding_tol(dtype, device)
    kept = slots >= 0
    flat = [c.view(-1, kv_heads, head_dim) for c in (*caches["fused"], *caches["same"])]
    assert torch.equal(flat[0][slots[kept]], k_out[kept]) and torch.equal(flat[1][slots[kept]], v[kept])
    untouched = torch.ones(blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[kept]] = False
    assert torch.equal(flat[0][untouched], flat[2][untouched]) and torch.equal(flat[1][untouched], flat[3][untouched])
    q_nc, k_nc = te.rope_and_cache(q, k, v, cos, sin, *weights, 1e-6, None, None)  # no cache: the same q, k
    assert torch.equal(q_nc, q_out) and torch.equal(k_nc, k_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(device, dtype):
    gen = torch.Generator().manual_seed(4)
    tokens, inter = (5, 200) if device == "cpu" else (300, 3072)
    x = 3 * randn(tokens, 2 * inter, dtype=dtype, device=device, gen=gen)
    out = te.silu_and_mul(x)
    assert out.shape == (tokens, inter)
    assert rel_err(out, reference.silu_and_mul(x.double())) < TOL[dtype]
    assert rel_err(out, reference.silu_and_mul(x)) < same_rounding_tol(dtype, device)


# ------------------------------------------------------------------------------------------ attention
def paged_case(device, dtype, cases, num_heads, num_kv_heads, head_dim, block_size, gen, shared_prefix_blocks=0):
    """A random paged cache holding `cases` = [(context_len, new_tokens)], blocks scattered with holes.

    Sequences 0 and 1 share their first `shared_prefix_blocks` blocks (prefix caching). Every block that
    no sequence uses is NaN, so reading one poisons the output.
    """
    lens = [c + n for c, n in cases]
    need = [-(-n // block_size) for n in lens]
    num_blocks = 2 * sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], set()
    for i, nb in enumerate(need):
        if i == 1 and shared_prefix_blocks:
            table = tables[0][:shared_prefix_blocks] + [order.pop() for _ in range(nb - shared_prefix_blocks)]
        else:
            table = [order.pop() for _ in range(nb)]
        order.pop()  # a hole between sequences
        tables.append(table)
        used.update(table)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = randn(*shape, dtype=dtype, device=device, gen=gen)
    v_cache = randn(*shape, dtype=dtype, device=device, gen=gen)
    unused = [b for b in range(num_blocks) if b not in used]
    k_cache[unused] = float("nan")
    v_cache[unused] = float("nan")
    width = max(need) + 2
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    starts = [0]
    for _, n in cases:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        max_query_len=max(n for _, n in cases),
        max_seq_len=max(lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=lens,
        block_tables=bt,
    )
    q = randn(starts[-1], num_heads, head_dim, dtype=dtype, device=device, gen=gen)
    return q, k_cache, v_cache, meta


def attention_truth(q, k_cache, v_cache, meta, scale):
    return reference.paged_attention(q.double(), k_cache.double(), v_cache.double(), meta, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("head_dim,heads", [(64, (4, 2)), (128, (8, 2))])
def test_prefill_paged_attention_ragged_chunked(device, dtype, head_dim, heads):
    """Fresh prompts, chunks after a cached prefix, and decode rows in one ragged batch."""
    gen = torch.Generator().manual_seed(5)
    if device == "cpu":
        cases = [(0, 70), (40, 1), (37, 19), (0, 5), (16, 3)]
    else:
        cases = [(0, 700), (900, 1), (300, 129), (0, 33), (2000, 64), (5, 1), (64, 256)]
    q, kc, vc, meta = paged_case(device, dtype, cases, *heads, head_dim, 16, gen, shared_prefix_blocks=0)
    scale = head_dim**-0.5
    out = ta.paged_attention(q, kc, vc, meta, scale)
    assert rel_err(out, attention_truth(q, kc, vc, meta, scale)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_split_kv_with_shared_blocks(device, dtype, group):
    """One query per sequence: the split-KV path, with two sequences sharing prefix blocks."""
    gen = torch.Generator().manual_seed(6)
    kv_heads, head_dim = 2, 64 if device == "cpu" else 128
    lens = [300, 290, 17, 1] if device == "cpu" else [4000, 3990, 1, 777, 64, 2049]
    q, kc, vc, meta = paged_case(device, dtype, [(n - 1, 1) for n in lens], group * kv_heads, kv_heads, head_dim, 16, gen,
                                 shared_prefix_blocks=8)
    assert ta.decode_num_splits(meta.num_seqs, kv_heads, meta.max_seq_len, 132) > 1
    scale = head_dim**-0.5
    out = ta.paged_attention(q, kc, vc, meta, scale)
    assert rel_err(out, attention_truth(q, kc, vc, meta, scale)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_decode_split_merge_counters_reset_between_launches(device):
    """The last split of each (sequence, KV head) merges: a batch of one at the most splits, then a wider batch,
    then the first again, each equal to the float64 reference, with every counter back at 0 after each launch."""
    gen = torch.Generator().manual_seed(8)
    dtype = torch.bfloat16
    one = paged_case(device, dtype, [(2 * 16 * 128 - 1, 1)], 4, 2, 64, 16, gen)
    wide = paged_case(device, dtype, [(n - 1, 1) for n in (700, 5, 333)], 4, 2, 64, 16, gen)
    assert ta.decode_num_splits(1, 2, one[3].max_seq_len, 132) == 16
    for q, kc, vc, meta in (one, wide, one):
        out = ta.paged_attention(q, kc, vc, meta, 0.125)
        assert rel_err(out, attention_truth(q, kc, vc, meta, 0.125)) < TOL[dtype]
        assert not ta._COUNTERS[q.device].any()


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_step_decode_rows_take_the_split_decode_kernel(device):
    """A step with prefill chunks and decode rows (long contexts: the decode kernel splits them): the decode rows in
    the decode kernel, the rest in the prefill kernel, equal to the float64 reference either way and to one prefill
    kernel for every row (single_token_seqs False), with every split counter back at 0. Then padded as a prefill
    CUDA graph pads: sequences that own no token (length 0) and tokens that no sequence owns."""
    gen = torch.Generator().manual_seed(9)
    dtype = torch.bfloat16
    cases = [(2 * 16 * 128 - 1, 1), (0, 37), (600, 1), (40, 9)]
    q, kc, vc, meta = paged_case(device, dtype, cases, 4, 2, 64, 16, gen)
    assert ta.decode_num_splits(meta.num_seqs, 2, meta.max_seq_len, 132) > 1
    truth = attention_truth(q, kc, vc, meta, 0.125)
    mixed = ta.paged_attention(q, kc, vc, meta, 0.125)
    assert rel_err(mixed, truth) < TOL[dtype] and not ta._COUNTERS[q.device].any()
    meta.single_token_seqs = False
    assert rel_err(ta.paged_attention(q, kc, vc, meta, 0.125), truth) < TOL[dtype]
    tokens = q.shape[0]
    padded = AttentionMetadata(
        torch.cat([meta.query_start_loc, torch.full((3,), tokens, dtype=torch.int32, device=device)]),
        torch.cat([meta.seq_lens, torch.zeros(3, dtype=torch.int32, device=device)]), 64, 4096, [0] * 8,
        [4096] * 7, torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:3])]))
    out = ta.paged_attention(torch.cat([q, randn(64 - tokens, 4, 64, dtype=dtype, device=device, gen=gen)]), kc, vc,
                             padded, 0.125)
    assert rel_err(out[:tokens], truth) < TOL[dtype] and not ta._COUNTERS[q.device].any()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_padding_rows_give_zeros(device):
    """CUDA-graph padding rows (seq_len 0) produce zeros, not NaN, and leave real rows alone."""
    gen = torch.Generator().manual_seed(7)
    dtype = torch.bfloat16
    q, kc, vc, meta = paged_case(device, dtype, [(99, 1), (5, 1)], 4, 2, 64, 16, gen)
    q = torch.cat([q, randn(2, 4, 64, dtype=dtype, device=device, gen=gen)])
    meta.seq_lens = torch.cat([meta.seq_lens, torch.zeros(2, dtype=torch.int32, device=device)])
    meta.query_start_loc = torch.arange(5, dtype=torch.int32, device=device)
    meta.block_tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables)])
    meta.seq_lens_cpu = meta.seq_lens_cpu + [0, 0]
    meta.query_start_loc_cpu = list(range(5))
    meta.max_seq_len = 2048  # as captured: the split count is fixed by the largest possible context
    out = ta.paged_attention(q, kc, vc, meta, 0.125)
    assert torch.equal(out[2:].float().cpu(), torch.zeros(2, 4, 64))
    real = AttentionMetadata(meta.query_start_loc[:3], meta.seq_lens[:2], 1, 100, [0, 1, 2], [100, 6], meta.block_tables[:2])
    assert rel_err(out[:2], attention_truth(q[:2], kc, vc, real, 0.125)) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("preload", [False, True])
def test_decode_with_rope_fused_is_rope_and_cache_then_attention(device, qk_norm, preload, monkeypatch):
    """Fast mode's decode step that rotates its own query and writes the step's key and value (`rope_decode`):
    strided q/k/v views of the projection, contexts that split and one that does not, and a CUDA-graph padding row
    (no keys, slot -1). The output and the whole cache have the bits of `rope_and_cache` then `paged_attention`.
    Compiled, the q/k norm's sum over a head may be reduced in another order (the two kernels' tiles differ), so on
    the GPU the bits are required without the norm and closeness with it. With `preload` (as under dependent launch)
    each split's first key tile is read before the step's key is written (its slot holds NaN here) and patched: the
    17- and 1-key contexts have the step's key in that tile, the 300-key one in a later tile."""
    from parity.kernels.triton import fast

    monkeypatch.setattr(ta, "preloads", lambda: preload)

    gen = torch.Generator().manual_seed(11)
    dtype, heads, kv_heads, head_dim, block = torch.bfloat16, 4, 2, 64, 16
    lens = [300, 17, 1] if device == "cpu" else [4000, 1, 777, 2049]
    _, k_cache, v_cache, meta = paged_case(device, dtype, [(n - 1, 1) for n in lens], heads, kv_heads, head_dim,
                                           block, gen)
    rows = len(lens) + 1  # the padding row last
    meta.seq_lens = torch.cat([meta.seq_lens, torch.zeros(1, dtype=torch.int32, device=device)])
    meta.query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=device)
    meta.block_tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables[:1])])
    meta.seq_lens_cpu, meta.query_start_loc_cpu = meta.seq_lens_cpu + [0], list(range(rows + 1))
    tables = meta.block_tables.cpu()
    meta.slot_mapping = torch.tensor([int(tables[s, (n - 1) // block]) * block + (n - 1) % block
                                      for s, n in enumerate(lens)] + [-1], device=device)
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device, gen=gen)
    q, k, v = (t.reshape(rows, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                                  kv_heads * head_dim], dim=-1))
    angles = torch.rand(rows, head_dim // 2, generator=gen) * 100
    cos, sin = (f(torch.cat([angles, angles], dim=-1)).to(device, dtype) for f in (torch.cos, torch.sin))
    weights = [(1 + 0.2 * randn(head_dim, dtype=torch.float32, device="cpu", gen=gen)).to(device, dtype)
               for _ in range(2)] if qk_norm else [None, None]
    assert ta.decode_num_splits(rows, kv_heads, meta.max_seq_len, 132) > 1
    pair_cache = (k_cache.clone(), v_cache.clone())
    q_rot, k_rot = te.rope_and_cache(q, k, v, cos, sin, *weights, 1e-6, pair_cache, meta.slot_mapping)
    pair = ta.paged_attention(q_rot, *pair_cache, meta, 0.125)

    assert ta.rope_fuses_into_decode(q, k, v, cos, sin, (k_cache, v_cache), meta)
    monkeypatch.setattr(fast, "rope_and_cache", None)  # the fused path must not call it
    fused = fast.rope_and_attention(q, k, v, cos, sin, *weights, 1e-6, (k_cache, v_cache), meta, 0.125)
    assert torch.equal(fused[-1], torch.zeros_like(fused[-1]))
    exact = device == "cpu" or not qk_norm
    assert torch.equal(fused, pair) if exact else rel_err(fused, pair) < TOL[dtype]
    for got, want in zip((k_cache, v_cache), pair_cache):  # unused blocks are NaN
        torch.testing.assert_close(got, want, equal_nan=True, **({"rtol": 0, "atol": 0} if exact else {}))
    assert not ta._COUNTERS[q.device].any()


@pytest.mark.gpu
def test_gpu_rope_decode_after_its_projection_under_dependent_launch_gives_the_eager_bits():
    """A decode step's qkv GEMV then `rope_decode` (16 splits, as the engine's graphs size them), captured with
    dependent launches as the small-batch decode graphs are, so each split's first key tile is loaded before the
    wait (`pdl.preloads`) while the GEMV runs. The step's slots are NaN again before the replay: the replay must
    patch them into its preloaded tiles and write them, giving the eager launch's output and cache bits (no q/k norm,
    whose sum another compiled variant may order differently)."""
    from parity.kernels.dispatch import dependent_launches
    from parity.kernels.triton import fast
    from parity.kernels.triton import gemv as tg

    gen = torch.Generator().manual_seed(12)
    dtype, heads, kv_heads, head_dim, block = torch.bfloat16, 16, 8, 128, 16
    lens = [1500, 17, 1, 700]
    _, k_cache, v_cache, meta = paged_case("cuda", dtype, [(n - 1, 1) for n in lens], heads, kv_heads, head_dim,
                                           block, gen)
    meta.max_seq_len = 8192  # the graphs' max_model_len: 16 splits
    tables = meta.block_tables.cpu()
    meta.slot_mapping = torch.tensor([int(tables[s, (n - 1) // block]) * block + (n - 1) % block
                                      for s, n in enumerate(lens)], device="cuda")
    width = (heads + 2 * kv_heads) * head_dim
    x, w, _ = operands(len(lens), width, 1024, dtype, "cuda", gen, False)
    angles = torch.rand(len(lens), head_dim // 2, generator=gen) * 100
    cos, sin = (f(torch.cat([angles, angles], dim=-1)).to("cuda", dtype) for f in (torch.cos, torch.sin))
    slots = meta.slot_mapping.long()

    def step():
        q, k, v = (t.reshape(len(lens), -1, head_dim)
                   for t in tg.gemv(x, w).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1))
        return fast.rope_and_attention(q, k, v, cos, sin, None, None, 1e-6, (k_cache, v_cache), meta, 0.125)

    assert ta.decode_num_splits(len(lens), kv_heads, meta.max_seq_len, ta._num_sms(x.device)) == 16
    eager = step()
    eager_cache = (k_cache.clone(), v_cache.clone())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), dependent_launches():
        replayed = step()
    for cache in (k_cache, v_cache):
        cache.view(-1, kv_heads, head_dim)[slots] = float("nan")
    graph.replay()
    assert torch.equal(replayed, eager)
    for got, want in zip((k_cache, v_cache), eager_cache):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_without_cache(device, dtype):
    gen = torch.Generator().manual_seed(8)
    lens = [3, 70, 1, 20] if device == "cpu" else [3, 700, 1, 200, 1025]
    heads, kv_heads, head_dim = 4, 2, 64
    meta = AttentionMetadata.for_packed_sequences(lens, device)
    q = randn(sum(lens), heads, head_dim, dtype=dtype, device=device, gen=gen)
    k = randn(sum(lens), kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    v = randn(sum(lens), kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    out = ta.varlen_attention(q, k, v, meta, 0.125)
    truth = reference.varlen_attention(q.double(), k.double(), v.double(), meta, 0.125)
    assert rel_err(out, truth) < TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kvcache_skips_padding(device, dtype):
    gen = torch.Generator().manual_seed(9)
    blocks, block_size, kv_heads, head_dim, tokens = 6, 4, 2, 64, 9
    k = randn(tokens, kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    # v as a strided view, as it comes out of the fused qkv projection
    v = randn(tokens, kv_heads, 2 * head_dim, dtype=dtype, device=device, gen=gen)[..., :head_dim]
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    slots[[2, 7]] = -1
    slots = slots.to(device)
    poison = randn(blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device, gen=gen)
    kc, vc, kr, vr = poison.clone(), poison.clone(), poison.clone(), poison.clone()
    ta.store_kvcache(k, v, kc, vc, slots)
    reference.store_kvcache(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


# --------------------------------------------------------------------------------------------- matmul
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 8, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_linear_few_rows_every_kernel_matches_float64_and_replays(rows, bias):
    """Fast mode's matmul at decode-sized row counts: the kernel timed fastest, and each candidate forced, match
    float64; a CUDA-graph replay gives the eager call's bits."""
    from parity.kernels.triton import fast, gemv

    gen = torch.Generator().manual_seed(11)
    for n, k in [(1024, 2048), (4096, 1024)]:
        x, w, b = operands(rows, n, k, torch.bfloat16, "cuda", gen, bias)
        ref = truth(x, w, b)
        eager = fast.linear(x, w, b)
        assert rel_err(eager, ref) < TOL[torch.bfloat16]
        key = (rows, "linear", (n, k), w.dtype, w.device, bias)
        assert (key in fast._FEW_ROW_CHOICE) == (rows <= fast.FEW_ROWS)
        if rows <= fast.FEW_ROWS:
            chosen = fast._FEW_ROW_CHOICE[key]
            for name in fast.FEW_ROW_KERNELS:
                if name != "gemv" or rows <= gemv.MAX_ROWS:
                    fast._FEW_ROW_CHOICE[key] = name
                    assert rel_err(fast.linear(x, w, b), ref) < TOL[torch.bfloat16], name
            fast._FEW_ROW_CHOICE[key] = chosen
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = fast.linear(x, w, b)
        graph.replay()
        assert torch.equal(replayed, eager)


@pytest.mark.gpu
def test_fast_linear_never_takes_a_kernel_that_disagrees_with_cublas(monkeypatch):
    from parity.kernels.triton import fast

    monkeypatch.setitem(fast.FEW_ROW_KERNELS, "narrow_tile", lambda x, w, b: torch.zeros_like(fast.F.linear(x, w, b)))
    monkeypatch.setattr(fast, "_FEW_ROW_CHOICE", {})
    monkeypatch.setattr(fast, "FASTER_MARGIN", 1e9)  # any time would do: only the disagreement may refuse it
    w = torch.randn(1024, 2048, device="cuda").bfloat16()
    with pytest.warns(RuntimeWarning, match="narrow_tile differs from cublas"):
        assert fast.few_row_kernel(8, w, None) == "cublas"  # 8 rows: the GEMV is no candidate


@pytest.mark.gpu
def test_fast_linear_never_takes_a_kernel_that_raises(monkeypatch):
    from parity.kernels.triton import fast

    def broken(x, w, b):
        raise RuntimeError("cannot compile")

    monkeypatch.setitem(fast.FEW_ROW_KERNELS, "narrow_tile", broken)
    monkeypatch.setattr(fast, "_FEW_ROW_CHOICE", {})
    monkeypatch.setattr(fast, "FASTER_MARGIN", 1e9)
    w = torch.randn(1024, 2048, device="cuda").bfloat16()
    with pytest.warns(RuntimeWarning, match="narrow_tile failed .RuntimeError: cannot compile"):
        assert fast.few_row_kernel(8, w, None) == "cublas"


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_fast_gate_up_silu_and_mul_every_kernel_matches_float64_and_replays(rows):
    """Fast mode's gate_up projection + SiLU-and-mul: the pair or, at <= 4 rows, the GEMV with SiLU-and-mul as its
    epilogue; the one timed fastest and each forced match float64, and a CUDA-graph replay gives the eager bits."""
    from parity.kernels.triton import fast, gemv

    gen = torch.Generator().manual_seed(13)
    x, w, _ = operands(rows, 6144, 1024, torch.bfloat16, "cuda", gen, False)
    y = truth(x, w, None)
    ref = torch.nn.functional.silu(y[:, :3072]) * y[:, 3072:]
    eager = fast.linear_silu_and_mul(x, w)
    assert rel_err(eager, ref) < 2 * TOL[torch.bfloat16]  # two roundings to bf16 (the projection's, SiLU's)
    key = (rows, "gate_up", (6144, 1024), w.dtype, w.device, False)
    assert (key in fast._FEW_ROW_CHOICE) == (rows <= gemv.MAX_ROWS)
    if rows <= gemv.MAX_ROWS:
        chosen = fast._FEW_ROW_CHOICE[key]
        for name in fast.GATE_UP_KERNELS:
            fast._FEW_ROW_CHOICE[key] = name
            assert rel_err(fast.linear_silu_and_mul(x, w), ref) < 2 * TOL[torch.bfloat16], name
        fast._FEW_ROW_CHOICE[key] = chosen
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = fast.linear_silu_and_mul(x, w)
    graph.replay()
    assert torch.equal(replayed, eager)


@pytest.mark.parametrize("deterministic", [False, True])
def test_linear_silu_and_mul_is_the_pair_where_nothing_fuses(deterministic):
    """On CPU (and in deterministic mode everywhere) nothing fuses: the same bits as linear then silu_and_mul."""
    from parity.kernels.dispatch import Kernels

    gen = torch.Generator().manual_seed(14)
    x, w, b = operands(3, 64, 48, torch.bfloat16, "cpu", gen, True)
    kernels = Kernels(deterministic=deterministic)
    assert torch.equal(kernels.linear_silu_and_mul(x, w, b), kernels.silu_and_mul(kernels.linear(x, w, b)))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("autograd", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("silu_and_mul", [False, True])
def test_rms_norm_linear_is_the_pair_where_nothing_fuses(monkeypatch, deterministic, triton, autograd, residual,
                                                         silu_and_mul):
    """Kernels.rms_norm_linear where nothing fuses: the reference and deterministic kernels, with autograd or without,
    in plain torch or (`triton`: the dispatch sees CUDA) the Triton kernels in the interpreter, fast mode's included
    (its few-row path needs CUDA tensors). The same bits as rms_norm, then linear or linear_silu_and_mul."""
    from parity.kernels import dispatch

    if triton:
        monkeypatch.setattr(dispatch, "device_kind", lambda x: "cuda")
    gen = torch.Generator().manual_seed(15)
    x, w, b = operands(3, 64, 48, torch.bfloat16, "cpu", gen, True)
    norm_w = (1 + 0.3 * randn(48, dtype=torch.float32, device="cpu", gen=gen)).bfloat16()
    res = randn(3, 48, dtype=torch.bfloat16, device="cpu", gen=gen) if residual else None
    x.requires_grad_(autograd)
    kernels = dispatch.Kernels(deterministic=deterministic)
    out = kernels.rms_norm_linear(x, norm_w, 1e-6, w, b, res, silu_and_mul)
    normed = kernels.rms_norm(x, norm_w, 1e-6, res)
    linear = kernels.linear_silu_and_mul if silu_and_mul else kernels.linear
    if residual:
        (out, out_sum), (normed, normed_sum) = out, normed
        assert torch.equal(out_sum, normed_sum)
    assert torch.equal(out, linear(normed, w, b))
    assert out.requires_grad == autograd


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("device", DEVICES)
def test_fused_gumbel_argmax_equals_torch_definition(device):
    gen = torch.Generator().manual_seed(10)
    batch, vocab = (3, 5000) if device == "cpu" else (64, 151936)
    logprobs = torch.log_softmax(2 * torch.randn(batch, vocab, generator=gen), -1).to(device)
    seeds = torch.tensor([12345, 2**61 + 7, 0] * (batch // 3) + [99] * (batch % 3), dtype=torch.int64, device=device)
    steps = torch.arange(batch, dtype=torch.int64, device=device) * 17
    gumbel = -torch.log(-torch.log(reference.uniform_noise(seeds, steps, vocab)))
    expected = (logprobs.double() + gumbel).argmax(dim=-1)
    assert torch.equal(ts.gumbel_argmax(logprobs, seeds, steps), expected)
    assert torch.equal(reference.gumbel_argmax(logprobs, seeds, steps), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 17, 256])
def test_fast_log_softmax_matches_torch_at_every_row_count_and_replays(rows):
    """Fast mode's log-softmax: the chunked Triton kernels up to FEW_ROWS rows, torch's beyond; within 1e-6 of
    torch's either way (a real vocabulary, a row with filtered tokens), and a CUDA-graph replay gives the eager bits."""
    from parity.kernels.triton import fast

    logits = 5 * torch.randn(rows, 151936, generator=torch.Generator().manual_seed(15)).cuda()
    logits[0, 1000:] = float("-inf")
    eager = fast.log_softmax(logits)
    torch.testing.assert_close(eager, torch.log_softmax(logits, -1), rtol=1e-6, atol=1e-5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = fast.log_softmax(logits)
    graph.replay()
    assert torch.equal(replayed, eager)
