"""Batch-invariant Triton kernels for deterministic mode on CUDA (see `invariant.py` for why).

Each kernel's reduction order is fixed by the shapes of one token's own work, never by the batch:
- `linear`: tiled matmul, no split-K: a row's dot products are one chain of tensor-core MMA steps over K in
  order (Triton folds `acc += dot(a, b)` into the MMA's accumulator), whichever tile the row lands in.
  Measured on the H200 (benchmarks/invariant_linear_sweep.py, bf16): every BLOCK_M / BLOCK_N / BLOCK_K / warps tried
  gives the same bits at every M, so `linear_config` may give decode batch sizes narrow tiles and deeper K
  steps (with K a multiple of them: no masked tail) and keep wide tiles for prefill and the trainer; a GPU test
  checks rows alone against a 2048-row batch at real shapes. With `fp32=True` (the LM head under logits_fp32)
  half-precision operands go through the tensor cores as they are (their products are exact in
  float32) with float32 sums and a float32 output, like the fast path's cuBLAS call: no fp32 weight copy.
  `linear_silu_and_mul` runs the gate_up projection with SiLU-and-mul as its epilogue: each column's MMA chain as
  `linear` runs it, rounded as `silu_and_mul` rounds it, so the engine's fused op and the trainer's autograd pair
  (which keeps the two ops for their backward) give the same bits.
- `attention`: `triton_attention.prefill` for prefill chunks, decode steps and the trainer's packed
  batch alike, with tiles fixed by the head layout (`attention_tile`: 16 rows = the GQA group x
  consecutive tokens; one token per tile at decode). Key tiles start at position 0 in BLOCK_N steps with
  an online softmax in float32; with KEY_SEGMENT > 0 (256: see there) the keys fall in fixed
  segments of that many positions, each its own online softmax, merged in order with explicit FMAs. A
  row's numbers depend on its own query and keys only (rows of an MMA are independent; key tiles and
  segments past a row's position are exact no-ops), so they do not depend on which tokens share its
  program. With segments, a small decode batch runs them in separate programs (split-KV with the split
  fixed by position, not by the batch) and merges them in the same order: the same bits as one program
  walking them. K/V come from the paged cache (through the block table) or from the packed tensors,
  the same values either way.
- `log_softmax`: fixed chunks of each row's vocabulary, a program each, their partials merged in a fixed order.
- RMSNorm, RoPE (with Qwen3's q/k norm and the cache write in one kernel) and SiLU-and-mul reuse `triton_norm` /
  `triton_elementwise`, whose programs own whole rows (RMSNorm), one token's heads (q/k norm + RoPE) or single
  elements (SiLU), so they are invariant already.
These are forward-only; `triton/invariant_autograd.py` wraps them for the trainer's parity forward.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from parity.kernels import reference
from parity.kernels.metadata import AttentionMetadata
from parity.kernels.triton.attention import prefill
from parity.kernels.triton.elementwise import apply_rotary, rope_and_cache, silu_and_mul, silu_mul  # a token a program
from parity.kernels.triton.mma import dot
from parity.kernels.triton.moe import fused_moe  # fixed tiles: a token's experts never see the batch
from parity.kernels.triton.norm import rms_norm
from parity.kernels.triton.pdl import LAUNCH, prefetch_rows, wait_for_previous
from parity.kernels.triton.sampling import gumbel_argmax

__all__ = ["apply_rotary", "argmax_logprob", "attention", "fused_moe", "gumbel_argmax", "linear", "linear_fp32",
           "linear_silu_and_mul", "log_softmax", "moe_route", "rms_norm",
           "rope_and_cache", "silu_and_mul"]

# The router's softmax and top-k in torch (a row's kernel follows the row length E): the engine and the trainer,
# which needs their gradient, get the same bits.
moe_route = reference.moe_route

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# -------------------------------------------------------------------------------------------- matmul
# Row counts are never specialised on (Triton compiles a separate variant for an argument equal to 1).
# With GLU the weight holds 2N rows (gate rows, then up rows) and a program's BLOCK_N columns are gate columns and
# the up columns N later, in two accumulators: each the MMA chain the plain kernel runs for that column, then rounded
# and SiLU-and-mul'ed as `silu_and_mul` rounds them, so the fused op gives the unfused pair's bits.
@triton.jit(do_not_specialize=["M"])
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, GLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PREFETCH:  # the program's weight rows stream while the previous kernel finishes
        prefetch_rows(w_ptr + offs_n.to(tl.int64) * stride_wn, offs_n < N, K, 8)
        if GLU:
            prefetch_rows(w_ptr + (N + offs_n).to(tl.int64) * stride_wn, offs_n < N, K, 8)
    wait_for_previous()
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[None, :] < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # GLU only
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=m_mask & (kk[None, :] < K), other=0.0)
        w_offs = offs_n[None, :].to(tl.int64) * stride_wn + kk[:, None]
        b = tl.load(w_ptr + w_offs, mask=n_mask & (kk[:, None] < K), other=0.0)
        acc += dot(a, b)  # fp16/bf16: tensor cores, exact products, float32 sums; fp32: IEEE (not tf32)
        if GLU:
            b_up = tl.load(w_ptr + N * stride_wn + w_offs, mask=n_mask & (kk[:, None] < K), other=0.0)
            acc_up += dot(a, b_up)
    dt = y_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_up += tl.load(b_ptr + N + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if GLU:
        out = silu_mul(acc.to(dt).to(tl.float32), acc_up.to(dt).to(tl.float32), dt)
    else:
        out = acc.to(dt)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], out, mask=m_mask & n_mask)


PREFETCH_ROWS = 16  # up to here a program's weight tile is read by it alone: prefetched under dependent launch (pdl.py)
FULL_GRID = 96  # output tiles from which a wider tile keeps the H200's 132 SMs busy enough (linear_config)


def linear_config(n: int, k: int, m: int, half: bool = True) -> dict:
    """Tile sizes for an [m, k] x [k, n] product with 16-bit (`half`) or float32 operands.

    From the CUDA-graph sweeps in benchmarks/invariant_linear_sweep.py (H200, bf16; every configuration gave the
    same bits): up to 128 rows, 32 output columns per program (16 rows at most 16) with 128-deep K steps, 256-deep
    for K >= 8192 at <= 16 rows (Qwen3-8B's down projection at batch 1: 1.12 -> 0.92x cuBLAS), take the layer GEMMs
    of a Qwen3-0.6B batch-1 step from 44 to 22 us. From 129 rows on, 8 warps and 3 stages: 128 x 128 tiles where
    at least 96 of them cover the output (1.5-1.6 -> 1.2-1.3x cuBLAS at 1024-4096 rows), else 64 x 128 where 96 of
    those do. Where neither does (the 1024-column o and down projections of Qwen3-0.6B up to ~700 rows: 32-64
    programs), 64 x 64 tiles with 128-deep K steps, 4 warps, 3 stages, else the <= 128-row tile: at 256 rows the
    o projection 2.01 -> 1.00x cuBLAS and down 2.39 -> 1.18x, at 512 rows 1.34x and 1.45x (sweep of 2026-12-01,
    evening). The wide LM head prefers 64 x 64 tiles at any M.
    float32 operands (IEEE FMA dots, not swept) keep one configuration for every M."""
    if INTERPRET:  # few, large programs: the CPU interpreter's cost is per program and per op
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1)
    if n >= 64 * 1024:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    if not half:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4)
    if m <= 16 and k >= 8192 and k % 256 == 0:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=5)
    deep_k = 128 if k % 128 == 0 else 64
    if m > 128:
        for block_m in (128, 64):
            if triton.cdiv(m, block_m) * triton.cdiv(n, 128) >= FULL_GRID:
                return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
        if triton.cdiv(m, 64) * triton.cdiv(n, 64) >= FULL_GRID:
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=deep_k, num_warps=4, num_stages=3)
    return dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=32, BLOCK_K=deep_k, num_warps=4, num_stages=4)


def glu_config(cfg: dict) -> dict:
    """A GLU launch's tiles from the plain launch's for the whole gate_up weight: BLOCK_N halved (the same grid, each
    program reading BLOCK_N gate and BLOCK_N up rows), but never below 32 columns, the narrowest tile the H200
    sweeps checked for bits."""
    return dict(cfg, BLOCK_N=max(32, cfg["BLOCK_N"] // 2))


def _linear_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp32: bool,
                    cfg: dict | None = None, glu: bool = False) -> torch.Tensor:
    """x2 W^T (+ b) [m, n], or with `glu` silu_and_mul of it [m, n / 2] (tiles: `glu_config`)."""
    m, k = x2.shape
    n = weight.shape[0]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out_dtype = torch.float32 if fp32 else x2.dtype
    cfg = cfg or linear_config(n, k, m, half=x2.dtype != torch.float32)
    if glu:
        n //= 2
        cfg = glu_config(cfg)
    y = torch.empty(m, n, dtype=out_dtype, device=x2.device)
    if m == 0:
        return y
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    _linear_kernel[grid](
        x2, weight, bias if bias is not None else weight, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GLU=glu, PREFETCH=m <= PREFETCH_ROWS and bool(LAUNCH), **cfg, **LAUNCH,
    )
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fp32: bool = False,
           tiles: dict | None = None) -> torch.Tensor:
    """y = x W^T (+ b); `fp32`: float32 products, sums and output from half-precision operands.
    `tiles` overrides `linear_config` (the tile sweep in benchmarks/ measures candidates)."""
    x2 = x.reshape(-1, x.shape[-1])
    if fp32 and x2.dtype != weight.dtype:
        x2, weight = x2.float(), weight.float()
    return _linear_forward(x2, weight, bias, fp32, tiles).reshape(*x.shape[:-1], weight.shape[0])


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x, weight, bias)) for a gate_up weight [2I, K] in one launch, with the pair's bits: the
    SiLU-and-mul is the matmul's epilogue, so the [T, 2I] projection is never written and read back."""
    x2 = x.reshape(-1, x.shape[-1])
    if weight.shape[0] % 2 or x2.dtype != weight.dtype:
        return silu_and_mul(linear(x, weight, bias))
    return _linear_forward(x2, weight, bias, False, glu=True).reshape(*x.shape[:-1], weight.shape[0] // 2)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T with float32 products, sums and output (the LM head under logits_fp32)."""
    return linear(x, weight, None, fp32=True)


# ------------------------------------------------------------------------------------------ attention
def attention_tile(num_heads: int, num_kv_heads: int) -> dict:
    """(tokens, heads) per program of `triton_attention.prefill`, from the head layout only: 16 rows, the
    whole GQA group (padded to a power of two) x as many consecutive tokens as fit."""
    heads = triton.next_power_of_2(num_heads // num_kv_heads)
    return dict(tokens=max(1, 16 // heads), heads=heads)


# Keys per softmax segment in every path (0: one online softmax over all keys). Segments let a small decode batch
# split its keys across programs with the bits of one program walking them (tests/test_determinism_triton.py
# checks it in the interpreter, `pytest -m gpu` compiled). benchmarks/invariant_attention_sweep.py on the H200
# (2026-12-01, Qwen3-0.6B heads, context 1024, 4 warps): a batch-1 decode step 24.9 -> 10.8 us (split), batch 32
# 48.6 -> 43.8 us, the trainer's packed 2 x 1024 prefill 86.8 -> 105.8 us (each segment restarts its pipeline).
KEY_SEGMENT = 256
SPLIT_BELOW_PROGRAMS = 256  # (sequence, KV head) pairs: at batch 1, 8 programs walk the whole context
# Segments take the kernel from 121 to 154 registers a thread (benchmarks/kernel_resources.py: 3 programs per SM
# instead of 4). Capped at 128 (ptxas spills the rest) the H200 sweep gave the same bits and a batch-256 decode
# step 287 -> 279 us, the packed 2 x 1024 prefill 105 -> 102 us, but batch 32 48.5 -> 50.7 and batch 1 (unsplit)
# 25.8 -> 27.2 us: the cap is for prefill and for decode batches of at least CAP_REGISTERS_FROM sequences.
SEGMENT_MAXNREG = 128
CAP_REGISTERS_FROM = 128


def split_decode(num_seqs: int, num_kv_heads: int, max_seq_len: int) -> bool:
    """Whether a decode step runs its key segments in programs of their own: with segments, while fewer than
    SPLIT_BELOW_PROGRAMS (sequence, KV head) programs would exist otherwise and the context can exceed one
    segment. Either way the bits are the same."""
    return bool(KEY_SEGMENT) and num_seqs * num_kv_heads < SPLIT_BELOW_PROGRAMS and max_seq_len > KEY_SEGMENT


def _attention_forward(q, k, v, meta: AttentionMetadata, scale: float, block_tables, page_size: int) -> torch.Tensor:
    decode = block_tables is not None and meta.is_decode(q.shape[0])
    split = decode and split_decode(meta.num_seqs, k.shape[-2], meta.max_seq_len)
    # Every row of q that a sequence owns is written, a row with no keys as zeros (split: by its segment 0), so only
    # rows past the last sequence need zeros from here.
    covered = meta.query_start_loc_cpu[-1] == q.shape[0]
    out = torch.empty_like(q) if covered else torch.zeros_like(q)
    if q.shape[0]:
        # A decode step pipelines one stage deeper: 23.0 vs 24.8 us at batch 1 on the H200, prefill 93 vs 87 us;
        # the same bits at every depth (benchmarks/invariant_attention_sweep.py).
        capped = KEY_SEGMENT and not split and (not decode or meta.num_seqs >= CAP_REGISTERS_FROM)
        prefill(q, k, v, out, meta, scale, block_tables, page_size, **attention_tile(q.shape[1], k.shape[-2]),
                segment=KEY_SEGMENT, split=split, num_stages=3 if decode else 2,
                maxnreg=SEGMENT_MAXNREG if capped else None)
    return out


def attention(q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attend over the paged cache (holding this step's k/v already) or within the packed sequences; one kernel
    and key order for every layout."""
    if kv_cache is None:
        # Contiguous [T, KV, D] K/V have the cache's strides, so Triton lays out (and reduces) the key
        # tiles of both paths the same way: its layouts follow the pointers' alignment and contiguity.
        return _attention_forward(q, k.contiguous(), v.contiguous(), meta, scale, None, 1)
    k_cache, v_cache = kv_cache
    return _attention_forward(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), meta, scale, meta.block_tables,
                              k_cache.shape[1])


# ---------------------------------------------------------------------------------------- log-softmax
# A row's vocabulary falls in fixed chunks of LOG_SOFTMAX_CHUNK positions, one program each: their (max, sum of
# exponentials) are merged in one fixed order, so a row's numbers follow its own values and V only. One program per
# row left a batch-1 step with a single busy SM (46 us on the H200 for 151,936 logits).
LOG_SOFTMAX_CHUNK = 2048 if INTERPRET else 8192
LOG_SOFTMAX_BLOCK = 1024 if INTERPRET else 2048


@triton.jit
def _chunk_max_sum_kernel(x_ptr, part_ptr, arg_ptr, V, stride_x, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                          ARGMAX: tl.constexpr):
    """(max, sum of exp(x - max)) of one chunk of one row; a chunk that is all -inf (filtered tokens) gives (-inf, 0).
    With ARGMAX, also the index of the chunk's first maximum (its first index if all -inf)."""
    wait_for_previous()
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    m = float("-inf")
    total = 0.0
    best = chunk * CHUNK
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, V), BLOCK):
        x = tl.load(x_ptr + row * stride_x + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        if ARGMAX:  # a later block takes over only with a strictly larger maximum: the first one wins a tie
            best = tl.where(block_max > m, start + tl.argmax(x, axis=0, tie_break_left=True), best)
        m_new = tl.maximum(m, block_max)
        scale = tl.where(m == m_new, 1.0, tl.exp(m - m_new))  # keeps exp(-inf - -inf) out
        total = total * scale + tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new)), axis=0)
        m = m_new
    part = part_ptr + (row * tl.num_programs(1) + chunk) * 2
    tl.store(part, m)
    tl.store(part + 1, total)
    if ARGMAX:
        tl.store(arg_ptr + row * tl.num_programs(1) + chunk, best)


@triton.jit
def _row_max_lse(part_ptr, row, NUM_CHUNKS: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """A row's (max per chunk [CHUNKS_P2], max, logsumexp) from its chunks' (max, sum) partials, merged in one fixed
    order: the one merge both the log-softmax and the argmax pick use, so their logsumexps are the same bits."""
    c = tl.arange(0, CHUNKS_P2)
    part = part_ptr + (row * NUM_CHUNKS + c) * 2
    m_c = tl.load(part, mask=c < NUM_CHUNKS, other=float("-inf"))
    s_c = tl.load(part + 1, mask=c < NUM_CHUNKS, other=0.0)
    m = tl.max(m_c, axis=0)
    return m_c, m, m + tl.log(tl.sum(tl.where(s_c == 0.0, 0.0, s_c * tl.exp(m_c - m)), axis=0))


@triton.jit
def _chunk_log_softmax_kernel(x_ptr, part_ptr, out_ptr, V, stride_x, stride_o, NUM_CHUNKS: tl.constexpr,
                              CHUNKS_P2: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """x - logsumexp(row) over one chunk, the row's logsumexp merged from all its chunks' partials."""
    wait_for_previous()
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    _, _, lse = _row_max_lse(part_ptr, row, NUM_CHUNKS, CHUNKS_P2)
    offs = tl.arange(0, BLOCK)
    for start in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, V), BLOCK):
        mask = start + offs < V
        x = tl.load(x_ptr + row * stride_x + start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + start + offs, x - lse, mask=mask)


@triton.jit
def _argmax_logprob_kernel(part_ptr, arg_ptr, token_ptr, logprob_ptr, NUM_CHUNKS: tl.constexpr,
                           CHUNKS_P2: tl.constexpr):
    """A row's first maximum (the first chunk holding the row's maximum, then that chunk's first) and its
    log-softmax value, max - logsumexp: the value `_chunk_log_softmax_kernel` writes there (x is the max)."""
    wait_for_previous()
    row = tl.program_id(0).to(tl.int64)
    m_c, m, lse = _row_max_lse(part_ptr, row, NUM_CHUNKS, CHUNKS_P2)
    c = tl.arange(0, CHUNKS_P2)
    arg_c = tl.load(arg_ptr + row * NUM_CHUNKS + c, mask=c < NUM_CHUNKS, other=0)
    first = tl.min(tl.where((m_c == m) & (c < NUM_CHUNKS), c, CHUNKS_P2), axis=0)
    tl.store(token_ptr + row, tl.sum(tl.where(c == first, arg_c, 0), axis=0).to(tl.int64))
    tl.store(logprob_ptr + row, m - lse)


def _chunk_partials(x: torch.Tensor, argmax: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Every (row, chunk)'s (max, sum) partials [N, chunks, 2], with argmax each chunk's first maximum [N, chunks]."""
    rows, vocab = x.shape
    chunks = triton.cdiv(vocab, LOG_SOFTMAX_CHUNK)
    part = torch.empty(rows, chunks, 2, dtype=torch.float32, device=x.device)
    arg = torch.empty(rows, chunks, dtype=torch.int32, device=x.device) if argmax else None
    _chunk_max_sum_kernel[(rows, chunks)](x, part, arg if argmax else part, vocab, x.stride(0), CHUNK=LOG_SOFTMAX_CHUNK,
                                          BLOCK=LOG_SOFTMAX_BLOCK, ARGMAX=argmax, num_warps=4, **LAUNCH)
    return part, arg, chunks


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the last dim of [N, V]: each row in fixed vocabulary chunks merged in a fixed order."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rows, vocab = x.shape
    if rows and vocab:
        part, _, chunks = _chunk_partials(x, argmax=False)
        _chunk_log_softmax_kernel[(rows, chunks)](x, part, out, vocab, x.stride(0), out.stride(0), NUM_CHUNKS=chunks,
                                                  CHUNKS_P2=triton.next_power_of_2(chunks), CHUNK=LOG_SOFTMAX_CHUNK,
                                                  BLOCK=LOG_SOFTMAX_BLOCK, num_warps=4, **LAUNCH)
    return out


def argmax_logprob(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax of float32 logits [N, V] (int64 [N]: the first of tied maxima, as torch.argmax) and its
    log-softmax value (float32 [N]), the same bits as `log_softmax(logits)` there, reading the logits once: a greedy
    sample without the [N, V] log-softmax written and read back."""
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, vocab = x.shape
    tokens = torch.zeros(rows, dtype=torch.int64, device=x.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows and vocab:
        part, arg, chunks = _chunk_partials(x, argmax=True)
        _argmax_logprob_kernel[(rows,)](part, arg, tokens, logprobs, NUM_CHUNKS=chunks,
                                        CHUNKS_P2=triton.next_power_of_2(chunks), num_warps=1, **LAUNCH)
    return tokens, logprobs
