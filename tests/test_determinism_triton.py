"""Deterministic-mode Triton kernels: batch invariance (bitwise) and closeness to the torch reference.

Without a GPU they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before any kernel is
defined) at small sizes; the interpreter's numpy arithmetic is not the GPU's, so these check the
kernels' logic (indexing, masking, one key order for paged and packed K/V, autograd). `-m gpu`
checks the compiled kernels and the whole engine on CUDA: a request alone == in any batch, and
engine logprobs == parity forward bit for bit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from parity.kernels import reference
from parity.kernels.metadata import AttentionMetadata
from parity.kernels.triton import invariant as ti
from parity.kernels.triton import invariant_autograd as tia
from parity.kernels.triton.attention import store_kvcache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _rel(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("dtype, bias", [(torch.float32, True), (torch.float16, False), (torch.bfloat16, True)])
def test_linear_silu_and_mul_is_the_pair_bit_for_bit(dtype, bias):
    """The gate_up projection with SiLU-and-mul as its epilogue gives the bits of the matmul then silu_and_mul (what
    the trainer's autograd forward runs), at every row count, and is close to float64."""
    inter, k = 40, 96  # 2I = 80 weight rows: gate columns in two tiles, the last one partial
    x, w = _randn(37, k, dtype=dtype), _randn(2 * inter, k, dtype=dtype, seed=1) * 0.2
    b = _randn(2 * inter, dtype=dtype, seed=2) if bias else None
    fused = ti.linear_silu_and_mul(x, w, b)
    assert fused.shape == (37, inter) and torch.equal(fused, ti.silu_and_mul(ti.linear(x, w, b)))
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    ref = torch.nn.functional.silu(ref[:, :inter]) * ref[:, inter:]
    assert _rel(fused, ref) < {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]  # three roundings
    for rows in (slice(0, 1), slice(5, 30)):
        assert torch.equal(ti.linear_silu_and_mul(x[rows], w, b), fused[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_is_row_invariant_and_close_to_torch(dtype):
    x, w, b = _randn(37, 80, dtype=dtype), _randn(70, 80, dtype=dtype, seed=1), _randn(70, dtype=dtype, seed=2)
    y = ti.linear(x, w, b)
    assert _rel(y, x.double() @ w.double().T + b.double()) < (1e-6 if dtype == torch.float32 else 2e-3)
    for rows in (slice(0, 1), slice(16, 17), slice(5, 30), slice(36, 37)):
        assert torch.equal(ti.linear(x[rows], w, b), y[rows])
    # LM head under logits_fp32: half-precision operands, float32 products, sums and output.
    y32 = ti.linear(x, w, None, fp32=True)
    assert y32.dtype == torch.float32 and _rel(y32, x.double() @ w.double().T) < 1e-6
    assert torch.equal(ti.linear(x[3:4], w, None, fp32=True), y32[3:4])


def test_linear_gradients():
    x = _randn(9, 40).requires_grad_()
    w = _randn(24, 40, seed=1).requires_grad_()
    b = _randn(24, seed=2).requires_grad_()
    (tia.linear(x, w, b) ** 2).sum().backward()
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    (torch.nn.functional.linear(x, w, b) ** 2).sum().backward()
    for got, t in zip(grads, (x, w, b)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_same_bits_from_paged_cache_and_packed_batch(dtype):
    num_heads, num_kv, head_dim, block = 4, 2, 32, 4
    lens = [20, 11]
    total = sum(lens)
    q, k, v = (_randn(total, h, head_dim, dtype=dtype, seed=s) for s, h in ((0, num_heads), (1, num_kv), (2, num_kv)))
    packed_meta = AttentionMetadata.for_packed_sequences(lens, DEVICE)
    packed = ti.attention(q, k, v, None, packed_meta, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert _rel(packed, reference.varlen_attention(q, k, v, packed_meta, head_dim**-0.5)) < tol

    # Sequence 0 again, through a paged cache with scattered blocks, in chunks 7 + 12 + 1 (prefill,
    # prefill, decode), next to sequence 1 in the same batch: the same bits for every token.
    k_cache = torch.full((16, block, num_kv, head_dim), float("nan"), dtype=dtype, device=DEVICE)  # unused: NaN
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.tensor([[9, 2, 14, 5, 0], [1, 3, 4, 0, 0]], dtype=torch.int32, device=DEVICE)
    other_done = 0
    out = []
    for start, end in ((0, 7), (7, 19), (19, 20)):
        other_end = min(lens[1], other_done + 4)
        q_lens = [end - start, other_end - other_done]
        slots = [int(tables[0, p // block]) * block + p % block for p in range(start, end)]
        slots += [int(tables[1, p // block]) * block + p % block for p in range(other_done, other_end)]
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor([end, other_end], dtype=torch.int32, device=DEVICE),
            max_query_len=max(q_lens), max_seq_len=end, query_start_loc_cpu=[0, q_lens[0], sum(q_lens)],
            seq_lens_cpu=[end, other_end], block_tables=tables, slot_mapping=torch.tensor(slots, device=DEVICE),
        )
        rows = torch.cat([torch.arange(start, end), lens[0] + torch.arange(other_done, other_end)]).to(DEVICE)
        store_kvcache(k[rows], v[rows], k_cache, v_cache, meta.slot_mapping)
        step = ti.attention(q[rows], k[rows], v[rows], (k_cache, v_cache), meta, head_dim**-0.5)
        out.append(step[: q_lens[0]])
        other_done = other_end
    assert torch.equal(torch.cat(out), packed[:20])


SEGMENT = 256  # the key segment the split decode is checked with (ti.KEY_SEGMENT's value)


def _check_split_decode(dtype, num_heads: int, num_kv: int, head_dim: int, lens: list[int], steps: list[list[int]],
                        monkeypatch):
    """A decode step (one query per sequence, at the positions `steps` gives) whose key segments run in programs
    of their own gives the bits of the same step in one program per row and of the packed (trainer) batch's row
    at that position; the packed batch matches the float64 reference."""
    from parity.kernels.triton.attention import prefill

    monkeypatch.setattr(ti, "KEY_SEGMENT", SEGMENT)  # the engine's and the trainer's path, with segments
    block, scale = 16, head_dim**-0.5
    q, k, v = (_randn(sum(lens), h, head_dim, dtype=dtype, seed=s) for s, h in ((3, num_heads), (4, num_kv), (5, num_kv)))
    packed_meta = AttentionMetadata.for_packed_sequences(lens, DEVICE)
    packed = ti.attention(q, k, v, None, packed_meta, scale)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]  # the reference rounds to dtype too
    assert _rel(packed, reference.varlen_attention(q, k, v, packed_meta, scale)) < tol

    pages = [(n + block - 1) // block for n in lens]
    order = torch.randperm(sum(pages) + 3, generator=torch.Generator().manual_seed(7))[: sum(pages)].tolist()
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32)
    for i, first in enumerate([sum(pages[:i]) for i in range(len(lens))]):
        tables[i, : pages[i]] = torch.tensor(order[first : first + pages[i]])
    tables = tables.to(DEVICE)
    k_cache = torch.full((sum(pages) + 3, block, num_kv, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = [int(tables[i, p // block]) * block + p % block for i, n in enumerate(lens) for p in range(n)]
    store_kvcache(k, v, k_cache, v_cache, torch.tensor(slots, device=DEVICE))

    starts = list(range(len(lens) + 1))
    for seq_lens in steps:
        rows = [sum(lens[:i]) + n - 1 for i, n in enumerate(seq_lens)]
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), max_query_len=1,
            max_seq_len=max(seq_lens), query_start_loc_cpu=starts, seq_lens_cpu=seq_lens, block_tables=tables,
        )
        q_step = q[rows].contiguous()
        one_program, split = torch.zeros_like(q_step), torch.zeros_like(q_step)
        for out, is_split in ((one_program, False), (split, True)):
            prefill(q_step, k_cache.flatten(0, 1), v_cache.flatten(0, 1), out, meta, scale, tables, block,
                    **ti.attention_tile(num_heads, num_kv), segment=SEGMENT, split=is_split)
        assert torch.equal(split, one_program), seq_lens
        assert torch.equal(split, packed[rows]), seq_lens
        assert ti.split_decode(len(lens), num_kv, meta.max_seq_len)  # the engine's path splits this step too
        assert torch.equal(ti.attention(q_step, None, None, (k_cache, v_cache), meta, scale), packed[rows]), seq_lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_key_segments_split_decode_equals_one_program_and_the_packed_batch(dtype, monkeypatch):
    """Contexts over several 256-key segments (600 and 300 keys), at their last positions and inside them."""
    _check_split_decode(dtype, 4, 2, 32, [600, 300], [[600, 300], [401, 300], [257, 256]], monkeypatch)


@pytest.mark.parametrize("context", [3, 300])  # 300 keys > SEGMENT: the step's segments run split
def test_attention_padding_rows_give_zeros(context, monkeypatch):
    """CUDA-graph padding: a sequence with one query row, context length 0 and slot -1 attends to nothing. Its row
    is written as zeros by the kernel: the output buffer holds NaN before the launch."""
    monkeypatch.setattr(ti, "KEY_SEGMENT", SEGMENT)
    block = 16
    pages = -(-context // block)
    k_cache, v_cache = _randn(pages, block, 2, 16, seed=2), _randn(pages, block, 2, 16, seed=3)
    tables = torch.zeros(2, pages, dtype=torch.int32, device=DEVICE)
    tables[0] = torch.arange(pages)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor([context, 0], dtype=torch.int32, device=DEVICE), max_query_len=1, max_seq_len=context,
        query_start_loc_cpu=[0, 1, 2], seq_lens_cpu=[context, 0], block_tables=tables,
        slot_mapping=torch.tensor([context - 1, -1], device=DEVICE),
    )
    q, k = _randn(2, 4, 16), _randn(2, 2, 16, seed=1)
    store_kvcache(k, k, k_cache, v_cache, meta.slot_mapping)
    assert ti.split_decode(2, 2, context) == (context > SEGMENT)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t: empty_like(t).fill_(float("nan")))
    out = ti.attention(q, k, k, (k_cache, v_cache), meta, 0.25)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros_like(out[1]))


def test_attention_gradients_come_from_the_reference():
    lens = [6, 3]
    q = _randn(9, 4, 16).requires_grad_()
    k = _randn(9, 2, 16, seed=1).requires_grad_()
    v = _randn(9, 2, 16, seed=2).requires_grad_()
    meta = AttentionMetadata.for_packed_sequences(lens, DEVICE)
    out = tia.attention(q, k, v, None, meta, 0.25)
    assert torch.equal(out.detach(), ti.attention(q.detach(), k.detach(), v.detach(), None, meta, 0.25))
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference.varlen_attention(q, k, v, meta, 0.25).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vocabs", [(2500, 9000), pytest.param((2500, 151936), id="gpu", marks=pytest.mark.gpu)])
def test_log_softmax_rows_invariant_close_and_differentiable(vocabs):
    """Several vocabulary chunks a row (a real vocabulary on the GPU), whole chunks of filtered tokens, a row that
    is one token; then the trainer's wrapper and its gradient."""
    for vocab in vocabs:
        logits = 5 * _randn(6, vocab)
        logits[1, 100:] = float("-inf")  # filtered tokens, including whole chunks
        logits[3, 1:] = float("-inf")
        out = ti.log_softmax(logits)
        torch.testing.assert_close(out, torch.log_softmax(logits, -1), rtol=1e-6, atol=1e-5)
        assert torch.equal(ti.log_softmax(logits[1:2]), out[1:2]) and torch.equal(ti.log_softmax(logits[4:]), out[4:])
    x = logits[2:4].clone().requires_grad_()
    assert torch.equal(tia.log_softmax(x).detach(), out[2:4])
    (tia.log_softmax(x) * torch.linspace(0, 1, vocab, device=DEVICE)).sum().backward()
    g = x.grad.clone()
    x.grad = None
    (torch.log_softmax(x, -1) * torch.linspace(0, 1, vocab, device=DEVICE)).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vocabs", [(2500, 9000), pytest.param((2500, 151936), id="gpu", marks=pytest.mark.gpu)])
def test_argmax_logprob_is_the_log_softmax_at_torchs_argmax(vocabs):
    """The greedy pick in one pass: torch.argmax's token (the first of tied maxima, within a block and across
    vocabulary chunks) and exactly the chunked log-softmax's value there; a row with one finite token, a row whose
    maximum sits past filtered chunks."""
    for vocab in vocabs:
        logits = 5 * _randn(7, vocab)
        logits[1, 100:] = float("-inf")
        logits[3, 1:] = float("-inf")
        logits[4, 7] = logits[4, vocab - 5] = logits[4].max() + 1  # tied across chunks
        logits[5, 10] = logits[5, 11] = logits[5].max() + 1  # tied within a block
        logits[6, : vocab - 3] = float("-inf")
        tokens, logprobs = ti.argmax_logprob(logits)
        assert torch.equal(tokens, logits.argmax(-1))
        assert torch.equal(logprobs, ti.log_softmax(logits)[torch.arange(7, device=DEVICE), tokens])
        assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32


def test_rms_norm_wrapper_is_row_invariant_with_reference_gradients():
    x = _randn(11, 64).requires_grad_()
    r = _randn(11, 64, seed=1)
    w = (1 + 0.1 * _randn(64, seed=2)).requires_grad_()
    out, summed = tia.rms_norm(x, w, 1e-6, r)
    ref_out, ref_sum = reference.rms_norm(x, w, 1e-6, r)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(ti.rms_norm(x[4:5].detach(), w.detach(), 1e-6, r[4:5])[0], out[4:5].detach())
    (out.sum() + summed.square().sum()).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (ref_out.sum() + ref_sum.square().sum()).backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("qk_norm", [True, False, pytest.param(True, id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the compiled kernel")])])
def test_rope_and_cache_wrapper_is_the_engine_kernel_with_reference_gradients(qk_norm):
    """The trainer's q/k norm + RoPE under autograd (no cache) gives the bits of the engine's call, which also
    writes the cache, for every token and for a token alone; gradients as autograd through the reference ops."""
    tokens, heads, kv_heads, head_dim = 7, 4, 2, 32
    q = _randn(tokens, heads, head_dim).requires_grad_()
    k = _randn(tokens, kv_heads, head_dim, seed=1).requires_grad_()
    v = _randn(tokens, kv_heads, head_dim, seed=2)
    angles = torch.arange(tokens, dtype=torch.float32)[:, None] * torch.linspace(0.1, 1.0, head_dim // 2)[None]
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(DEVICE) for f in (torch.cos, torch.sin))
    weights = [(1 + 0.1 * _randn(head_dim, seed=s)).requires_grad_() for s in (3, 4)] if qk_norm else [None, None]
    q_out, k_out = tia.rope_and_cache(q, k, v, cos, sin, *weights, 1e-6, None, None)
    plain = [None if w is None else w.detach() for w in weights]
    cache = (torch.zeros(8, 4, kv_heads, head_dim, device=DEVICE), torch.zeros(8, 4, kv_heads, head_dim, device=DEVICE))
    slots = torch.arange(tokens, device=DEVICE) + 3
    engine_q, engine_k = ti.rope_and_cache(q.detach(), k.detach(), v, cos, sin, *plain, 1e-6, cache, slots)
    assert torch.equal(q_out.detach(), engine_q) and torch.equal(k_out.detach(), engine_k)
    alone_q, alone_k = ti.rope_and_cache(q.detach()[5:6], k.detach()[5:6], v[5:6], cos[5:6], sin[5:6], *plain, 1e-6,
                                         None, None)
    assert torch.equal(alone_q, engine_q[5:6]) and torch.equal(alone_k, engine_k[5:6])
    ref_q, ref_k = reference.rope_and_cache(q, k, v, cos, sin, *weights, 1e-6, None, None)
    projection = [_randn(*t.shape, seed=9 + i) for i, t in enumerate((ref_q, ref_k))]
    wrt = [q, k] + [w for w in weights if w is not None]
    got = torch.autograd.grad(sum((o * p).sum() for o, p in zip((q_out, k_out), projection)), wrt)
    want = torch.autograd.grad(sum((o * p).sum() for o, p in zip((ref_q, ref_k), projection)), wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ on the GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_linear_rows_alone_equal_a_2048_row_batch_at_model_shapes(dtype):
    """`linear_config` gives decode batch sizes narrower tiles and deeper K steps than prefill and the trainer,
    and from 129 rows on 128 x 128, 64 x 128, 64 x 64 or 64 x 32 tiles by how many cover the output: a row's bits
    must not move.
    Qwen3-0.6B's qkv and down projections, Qwen3-8B's down (K = 12288: 256-deep steps at <= 16 rows), SmolLM2's
    gate/up (K = 576: 64-deep steps), the LM head's float32 output."""
    for n, k, fp32 in ((4096, 1024, False), (1024, 3072, False), (4096, 12288, False), (3072, 576, False),
                       (65536, 1024, True)):
        w = _randn(n, k, dtype=dtype, seed=1) * 0.02
        x = _randn(2048, k, dtype=dtype)
        big = ti.linear(x, w, None, fp32)
        for m in (1, 5, 16, 17, 64, 128, 129, 256, 320, 512, 1024):
            assert torch.equal(ti.linear(x[:m].clone(), w, None, fp32), big[:m]), (n, k, m)
    assert ti.linear_config(4096, 1024, 1) != ti.linear_config(4096, 1024, 2048) != ti.linear_config(4096, 1024, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_linear_silu_and_mul_is_the_pair_bit_for_bit_at_model_shapes(dtype):
    """The engine's fused gate_up + SiLU-and-mul against the pair the trainer's autograd forward runs: the same bits
    at decode and prefill row counts (Qwen3-0.6B's and SmolLM2's gate_up weights)."""
    for inter, k in ((3072, 1024), (1536, 576)):
        w = _randn(2 * inter, k, dtype=dtype, seed=1) * 0.02
        x = _randn(2048, k, dtype=dtype)
        for m in (1, 3, 16, 64, 129, 256, 512, 2048):
            pair = ti.silu_and_mul(ti.linear(x[:m], w))
            assert torch.equal(ti.linear_silu_and_mul(x[:m], w), pair), (inter, k, m)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_attention_split_decode_equals_the_packed_batch_at_model_shapes(dtype, monkeypatch):
    """Qwen3-0.6B's heads (16 query, 8 KV, head_dim 128), contexts of 1,500, 700 and 90 keys."""
    _check_split_decode(dtype, 16, 8, 128, [1500, 700, 90], [[1500, 700, 90], [1024, 513, 1], [256, 257, 64]],
                        monkeypatch)


def _gpu_deterministic_run(model_dir, dtype: str, params):
    """A batch of 8 mixed-length prompts (chunked prefill, CUDA-graph decode; prompt 4 longer than a 256-key segment),
    then prompts 0, 4, 7 alone."""
    from parity.engine.engine import Engine

    engine = Engine.from_pretrained(model_dir, dtype=dtype, deterministic=True, max_model_len=512,
                                    max_num_batched_tokens=64, kv_cache_memory=64 << 20)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 90, 41, 9, 290, 3, 60, 17)]
    batch = engine.generate(prompts, params)
    for i in (0, 4, 7):
        alone = engine.generate([prompts[i]], params)[0]
        assert alone.output_ids == batch[i].output_ids and alone.output_logprobs == batch[i].output_logprobs
        assert alone.output_raw_logprobs == batch[i].output_raw_logprobs
    return engine, prompts, batch


@pytest.mark.gpu
@pytest.mark.parametrize("architecture, dtype, segment", [("llama", "bf16", SEGMENT), ("llama", "fp16", SEGMENT),
                                                          ("llama", "bf16", 0), ("qwen3", "bf16", SEGMENT)])
def test_gpu_engine_batch_invariant_and_equal_to_parity_forward(model_dirs, architecture, dtype, segment, monkeypatch):
    """With key segments (KEY_SEGMENT's 256): chunked prefill over a segment boundary, split decode steps in the
    CUDA graphs (captured for max_model_len 512), the trainer's packed forward unsplit; without (0), one online
    softmax over all keys. Qwen3: its q/k norm runs in the RoPE kernel, the engine's and the trainer's."""
    from parity.engine.sampling_params import SamplingParams
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    monkeypatch.setattr(ti, "KEY_SEGMENT", segment)

    params = SamplingParams(temperature=0.9, max_tokens=40, seed=3, ignore_eos=True)
    engine, prompts, batch = _gpu_deterministic_run(model_dirs[architecture], dtype, params)
    trainer = parity_model_from_engine(engine)
    scored = token_logprobs(trainer, prompts, [r.output_ids for r in batch], temperature=0.9)
    for r, lp in zip(batch, scored):
        assert lp.tolist() == r.output_logprobs


@pytest.mark.gpu
def test_gpu_filtered_sampling_is_batch_invariant(llama_dir):
    """top-k / top-p / min-p filters run in torch on the batch's logits: their tokens and processed
    logprobs must not depend on the batch either."""
    from parity.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, max_tokens=40, seed=5,
                            ignore_eos=True, raw_logprobs=True)
    _gpu_deterministic_run(llama_dir, "bf16", params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu test runs the compiled kernels")
@pytest.mark.parametrize("architecture, segment, prompt_lens, max_num_batched_tokens",
                         [("qwen2", 0, (4, 13), 8), ("qwen2", SEGMENT, (4, 270), 64), ("qwen3", 0, (4, 13), 8)])
def test_engine_on_triton_kernels_in_the_interpreter(tmp_path, monkeypatch, architecture, segment, prompt_lens,
                                                     max_num_batched_tokens):
    """The whole deterministic engine on the Triton kernels (interpreted, on CPU tensors): a request
    alone == in a batch with chunked prefill, and == the parity forward on the same kernels. A one-layer
    model with two heads keeps the interpreter (seconds per hundred programs) fast enough. With key segments:
    prefill chunks across a segment boundary and split decode steps; Qwen3: its q/k norm in the RoPE kernel."""
    from parity.engine.engine import Engine
    from parity.engine.sampling_params import SamplingParams
    from parity.kernels import dispatch
    from parity.testing.factory import TinyModelSpec, write_tiny_model
    from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

    spec = TinyModelSpec(architecture=architecture, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, vocab_size=300)
    monkeypatch.setattr(dispatch, "device_kind", lambda x: "cuda")
    monkeypatch.setattr(ti, "KEY_SEGMENT", segment)
    splits = []  # the split flag of every attention launch
    launch = ti.prefill
    monkeypatch.setattr(ti, "prefill", lambda *a, split=False, **kw: splits.append(split) or launch(*a, split=split, **kw))
    engine = Engine.from_pretrained(write_tiny_model(tmp_path / "m", spec), dtype="fp32", deterministic=True,
                                    max_model_len=512, max_num_batched_tokens=max_num_batched_tokens,
                                    kv_cache_memory=1 << 20)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in prompt_lens]
    params = SamplingParams(temperature=0.8, max_tokens=3, seed=3, ignore_eos=True)
    batch = engine.generate(prompts, params)
    alone = engine.generate([prompts[1]], params)[0]
    assert alone.output_ids == batch[1].output_ids and alone.output_logprobs == batch[1].output_logprobs
    scored = token_logprobs(parity_model_from_engine(engine), prompts, [r.output_ids for r in batch], temperature=0.8)
    for r, lp in zip(batch, scored):
        assert lp.tolist() == r.output_logprobs
    assert any(splits) == bool(segment)  # with segments the decode steps past 256 keys ran split
