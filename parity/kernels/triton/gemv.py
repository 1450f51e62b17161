"""Matrix-vector products for fast mode's decode matmuls of very few rows (at most `MAX_ROWS`).

A tensor-core tile wastes most of its rows on a one-token batch, and with 32 output columns per program a
1024-column projection runs on only 32 programs. Here each program owns `BLOCK_N` output columns (rows of W),
walks K in `BLOCK_K` chunks, loads each W tile once and uses it for every x row: plain float32 products and sums
(no tensor cores), so the work is streaming W from memory across many programs. Whether this kernel, the narrow
matmul tile or cuBLAS serves a given (rows, weight shape) is decided by timing elsewhere; this module only
computes the product.

At batch 1 a decoder layer is ~10 kernels of a few us, and each boundary between two costs ~1-2 us. Two fused
variants remove one boundary each: `rms_norm_gemv` normalises x (with the residual add) inside the GEMV that reads
it (the qkv and gate_up projections), `gemv_silu_and_mul` applies SiLU-and-mul to the gate_up GEMV's output before
storing it; `rms_norm_gemv(..., silu_and_mul=True)` does both in one launch. All round every intermediate as the
unfused kernels do. Fast mode takes them where they time faster than the unfused pair: `gemv_silu_and_mul` for the
gate_up projection alone (`fast.linear_silu_and_mul`), `rms_norm_gemv` for a decoder layer's input norm + qkv
projection and its post-attention norm + gate_up projection with SiLU-and-mul (`fast.rms_norm_linear`), each timed
against the unfused pair under dependent launch.

Under dependent launch (`pdl.preloads`) a program loads its first one or two W chunks before `wait_for_previous`,
so they stream while the previous kernel finishes; a layer's four projections at batch 1 were ~20 us of a 1 ms step,
about 37% of the bandwidth, because each read started only once the kernel before it was done.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from parity.kernels.triton.elementwise import silu_mul
from parity.kernels.triton.norm import scale_normalised
from parity.kernels.triton.pdl import LAUNCH, preloads, wait_for_previous

__all__ = ["MAX_ROWS", "gemv", "gemv_config", "gemv_silu_and_mul", "rms_norm_gemv"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_ROWS = 4  # rows of x after flattening its leading dims


@triton.jit
def _row_chunk(x_row_ptr, r_row_ptr, kk, mask, HAS_RESIDUAL: tl.constexpr):
    """One x row's chunk in x's dtype; with HAS_RESIDUAL, x + residual rounded to it (`reference.rms_norm`'s sum)."""
    x = tl.load(x_row_ptr + kk, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_row_ptr + kk, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _squares(x_row_ptr, r_row_ptr, sum_row_ptr, kk, k_end, sum_end, HAS_RESIDUAL: tl.constexpr):
    """Squares (float32) of one row's chunk, for its mean square. With HAS_RESIDUAL the rounded x + residual is
    also stored where kk < sum_end: program 0's bound is the row's, every other program's 0, so it is written once."""
    h = _row_chunk(x_row_ptr, r_row_ptr, kk, kk < k_end, HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(sum_row_ptr + kk, h, mask=kk < sum_end)
    h = h.to(tl.float32)
    return h * h


@triton.jit
def _inverse_rms(x_ptr, r_ptr, sum_ptr, K, k1, k2, k3, stride_xm, stride_rm, eps,
                 HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each row's 1 / RMS over all of K, float32 as `reference.rms_norm` (mean of the squares, + eps). Every program
    recomputes it from the whole row (a few KB, L2-resident after the first reads) rather than waiting for another
    program's. The rows' sums x + residual go to sum_ptr ([M, K], contiguous)."""
    offs_k = tl.arange(0, BLOCK_K)
    first = tl.program_id(0) == 0
    ss0 = tl.zeros([BLOCK_K], tl.float32)
    ss1 = tl.zeros([BLOCK_K], tl.float32)
    ss2 = tl.zeros([BLOCK_K], tl.float32)
    ss3 = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        ss0 += _squares(x_ptr, r_ptr, sum_ptr, kk, K, tl.where(first, K, 0), HAS_RESIDUAL)
        if ROWS > 1:
            ss1 += _squares(x_ptr + stride_xm, r_ptr + stride_rm, sum_ptr + K, kk, k1, tl.where(first, k1, 0),
                            HAS_RESIDUAL)
        if ROWS > 2:
            ss2 += _squares(x_ptr + 2 * stride_xm, r_ptr + 2 * stride_rm, sum_ptr + 2 * K, kk, k2,
                            tl.where(first, k2, 0), HAS_RESIDUAL)
            ss3 += _squares(x_ptr + 3 * stride_xm, r_ptr + 3 * stride_rm, sum_ptr + 3 * K, kk, k3,
                            tl.where(first, k3, 0), HAS_RESIDUAL)
    return (tl.rsqrt(tl.sum(ss0) / K + eps), tl.rsqrt(tl.sum(ss1) / K + eps), tl.rsqrt(tl.sum(ss2) / K + eps),
            tl.rsqrt(tl.sum(ss3) / K + eps))


@triton.jit
def _row_dot(w, x_row_ptr, r_row_ptr, kk, mask, norm_w, inv, dt: tl.constexpr, NORM: tl.constexpr,
             HAS_RESIDUAL: tl.constexpr):
    """One x row's chunk against the [rows, BLOCK_K] W tile (float32): a partial dot product per W row. With NORM the
    chunk is first normalised as `rms_norm` casts it (`scale_normalised`, then rounded to `dt`, the dtype the
    unfused norm returns and the GEMV would read)."""
    x = _row_chunk(x_row_ptr, r_row_ptr, kk, mask, HAS_RESIDUAL)
    if NORM:
        x = scale_normalised(x.to(tl.float32), inv, norm_w, x.dtype).to(dt)
    return tl.sum(w * x.to(tl.float32)[None, :], axis=1)


@triton.jit
def _w_chunk(w_rows, kk, tile_mask, K):
    """The program's W tile [rows, BLOCK_K] at columns kk (zeros past K), in W's dtype."""
    return tl.load(w_rows + kk[None, :], mask=tile_mask[:, None] & (kk[None, :] < K), other=0.0)


@triton.jit
def _accumulate(w, kk, acc0, acc1, acc2, acc3, x_ptr, r_ptr, norm_w_ptr, K, k1, k2, k3, stride_xm, stride_rm,
                inv0, inv1, inv2, inv3, dt: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                ROWS: tl.constexpr):
    """Each row's accumulator plus its partial dot products with one W chunk (columns kk)."""
    w = w.to(tl.float32)
    norm_w = tl.load(norm_w_ptr + kk, mask=kk < K, other=0.0).to(tl.float32) if NORM else 1.0
    acc0 += _row_dot(w, x_ptr, r_ptr, kk, kk < K, norm_w, inv0, dt, NORM, HAS_RESIDUAL)  # M >= 1 when it runs
    if ROWS > 1:
        acc1 += _row_dot(w, x_ptr + stride_xm, r_ptr + stride_rm, kk, kk < k1, norm_w, inv1, dt, NORM, HAS_RESIDUAL)
    if ROWS > 2:
        acc2 += _row_dot(w, x_ptr + 2 * stride_xm, r_ptr + 2 * stride_rm, kk, kk < k2, norm_w, inv2, dt, NORM,
                         HAS_RESIDUAL)
        acc3 += _row_dot(w, x_ptr + 3 * stride_xm, r_ptr + 3 * stride_rm, kk, kk < k3, norm_w, inv3, dt, NORM,
                         HAS_RESIDUAL)
    return acc0, acc1, acc2, acc3


@triton.jit
def _row_output(acc, dt: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr):
    """One row's BLOCK_N outputs in `dt`: its sums or, with GLU, silu(gate) * up of the tile's interleaved (gate, up)
    pairs, each rounded to `dt` first as the unfused GEMV's output is."""
    if GLU:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_N, 2)))
        out = silu_mul(gate.to(dt).to(tl.float32), up.to(dt).to(tl.float32), dt)
    else:
        out = acc.to(dt)
    return out


# ROWS (the row count padded to 1, 2 or 4) is a constexpr: one compiled variant per padded count. The row count M
# itself is a runtime argument and never specialised on (Triton would compile another variant for M == 1), so 3
# rows run the 4-row variant with the fourth row masked.
# NORM (with HAS_RESIDUAL) and GLU are the fused variants' prologue and epilogue; without them this is the plain
# GEMV, and r_ptr, norm_w_ptr, sum_ptr, stride_rm and eps go unread.
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, norm_w_ptr, sum_ptr, M, N, K, stride_xm, stride_rm, stride_wn, stride_ym, eps,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GLU: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRELOAD: tl.constexpr,
):
    pid = tl.program_id(0)
    if GLU:  # tile row 2j is gate column j, row 2j + 1 up column j (W row N + j): one tile load streams both
        t = tl.arange(0, 2 * BLOCK_N)
        cols = pid * BLOCK_N + t // 2
        w_idx = cols + (t % 2) * N
    else:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        w_idx = cols
    tile_mask = cols < N
    w_rows = (w_ptr + w_idx.to(tl.int64) * stride_wn)[:, None]
    offs_k = tl.arange(0, BLOCK_K)
    # Weights are no kernel's output (pdl.py): the first PRELOAD chunks (0-2) load while the previous kernel runs.
    if PRELOAD > 0:
        w_a = _w_chunk(w_rows, offs_k, tile_mask, K)
    if PRELOAD > 1:
        w_b = _w_chunk(w_rows, BLOCK_K + offs_k, tile_mask, K)
    wait_for_previous()
    # A row past M reads and writes nothing: its K and N bounds are 0 (bounds rather than `mask & (M > r)`, which
    # the interpreter turns into an int32 mask).
    k1, k2, k3 = tl.where(M > 1, K, 0), tl.where(M > 2, K, 0), tl.where(M > 3, K, 0)
    dt = y_ptr.dtype.element_ty
    if NORM:
        inv0, inv1, inv2, inv3 = _inverse_rms(x_ptr, r_ptr, sum_ptr, K, k1, k2, k3, stride_xm, stride_rm, eps,
                                              HAS_RESIDUAL, ROWS, BLOCK_K)
    else:
        inv0, inv1, inv2, inv3 = 1.0, 1.0, 1.0, 1.0
    acc0 = tl.zeros(w_idx.shape, tl.float32)
    acc1 = tl.zeros(w_idx.shape, tl.float32)
    acc2 = tl.zeros(w_idx.shape, tl.float32)
    acc3 = tl.zeros(w_idx.shape, tl.float32)
    # The preloaded chunks first, then the loop's: the same sums in the same order as the loop alone.
    if PRELOAD > 0:
        acc0, acc1, acc2, acc3 = _accumulate(w_a, offs_k, acc0, acc1, acc2, acc3, x_ptr, r_ptr, norm_w_ptr, K, k1, k2,
                                             k3, stride_xm, stride_rm, inv0, inv1, inv2, inv3, dt, NORM, HAS_RESIDUAL,
                                             ROWS)
    if PRELOAD > 1:
        acc0, acc1, acc2, acc3 = _accumulate(w_b, BLOCK_K + offs_k, acc0, acc1, acc2, acc3, x_ptr, r_ptr, norm_w_ptr,
                                             K, k1, k2, k3, stride_xm, stride_rm, inv0, inv1, inv2, inv3, dt, NORM,
                                             HAS_RESIDUAL, ROWS)
    for k0 in range(PRELOAD * BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        acc0, acc1, acc2, acc3 = _accumulate(_w_chunk(w_rows, kk, tile_mask, K), kk, acc0, acc1, acc2, acc3, x_ptr,
                                             r_ptr, norm_w_ptr, K, k1, k2, k3, stride_xm, stride_rm, inv0, inv1, inv2,
                                             inv3, dt, NORM, HAS_RESIDUAL, ROWS)
    if HAS_BIAS:
        b = tl.load(b_ptr + w_idx, mask=tile_mask, other=0.0).to(tl.float32)
        acc0 += b
        acc1 += b
        acc2 += b
        acc3 += b
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs_n, _row_output(acc0, dt, GLU, BLOCK_N), mask=offs_n < N)
    if ROWS > 1:
        tl.store(y_ptr + stride_ym + offs_n, _row_output(acc1, dt, GLU, BLOCK_N), mask=offs_n < tl.where(M > 1, N, 0))
    if ROWS > 2:
        tl.store(y_ptr + 2 * stride_ym + offs_n, _row_output(acc2, dt, GLU, BLOCK_N),
                 mask=offs_n < tl.where(M > 2, N, 0))
        tl.store(y_ptr + 3 * stride_ym + offs_n, _row_output(acc3, dt, GLU, BLOCK_N),
                 mask=offs_n < tl.where(M > 3, N, 0))


def _device_config(n: int, k: int, rows: int) -> dict:
    """4 output columns a program; K chunks half as deep as K at one row (at most 1024), all of K at more rows (at
    most 2048). From `benchmarks/gemv_sweep.py` on the H200, weights read from HBM as in a decode step (Qwen3-0.6B's
    projections at 1, 2 and 4 rows): a read of a few MB is latency-bound, so what counts is bytes in flight per
    program. This rule has the best launch's columns and depth at 9 of the 12 (shape, rows) cases (e.g. the o
    projection at 2 rows: 3.2 us against cuBLAS's 13.2), where the 8-16-column, 256-512-deep first guess ran 1.2-2x
    slower; the rule's own launch was not timed at the other 3 (benchmarks/RESULTS.md)."""
    kp2 = triton.next_power_of_2(k)
    block_k = min(kp2 // 2, 1024) if rows == 1 else min(kp2, 2048)
    return dict(BLOCK_N=4, BLOCK_K=max(16, block_k), num_warps=4, num_stages=3)


def gemv_config(n: int, k: int, rows: int) -> dict:
    """Launch configuration for `rows` (at most MAX_ROWS) rows against an [n, k] weight. Under TRITON_INTERPRET:
    few large programs, since the CPU interpreter's cost is per program and per op."""
    if INTERPRET:
        return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1)
    return _device_config(n, k, rows)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rows(fn: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] as its rows [M, K] with unit stride along K, once M, W [N, K] and the bias [N] are checked."""
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"{fn}: weight of shape {tuple(weight.shape)} does not match x's last dim {k}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{fn}: bias of shape {tuple(bias.shape)} does not match weight's {weight.shape[0]} rows")
    x2 = x.reshape(-1, k)
    if x2.shape[0] > MAX_ROWS:
        raise ValueError(f"{fn} takes at most {MAX_ROWS} rows, got {x2.shape[0]} (x of shape {tuple(x.shape)})")
    return _unit_stride(x2)


def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, tiles: dict | None,
            norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
            residual_sum: torch.Tensor | None = None, glu: bool = False) -> None:
    """y [M, N] from one `_gemv_kernel` launch; the keyword operands switch on the fused variants' parts. Default
    tiles: `gemv_config` of the whole weight; with GLU its BLOCK_N halved, since a program's tile holds BLOCK_N gate
    and BLOCK_N up rows: the same W tile and program count as the unfused gate_up GEMV's. Under `pdl.preloads()`
    the first (up to two) W chunks load before the wait (the same sums in the same order)."""
    (m, k), n = x2.shape, y.shape[1]
    if not (m and n):
        return
    if tiles is None:
        tiles = gemv_config(weight.shape[0], k, m)
        tiles = dict(tiles, BLOCK_N=max(1, tiles["BLOCK_N"] // 2)) if glu else tiles
    weight = _unit_stride(weight)
    r2 = residual if residual is not None else x2
    _gemv_kernel[(triton.cdiv(n, tiles["BLOCK_N"]),)](
        x2, weight, bias if bias is not None else weight, y, r2, norm_weight if norm_weight is not None else weight,
        residual_sum if residual_sum is not None else y, m, n, k, x2.stride(0), r2.stride(0), weight.stride(0),
        y.stride(0), float(eps), HAS_BIAS=bias is not None, NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None, GLU=glu, ROWS=triton.next_power_of_2(m),
        PRELOAD=min(2, triton.cdiv(k, tiles["BLOCK_K"])) if preloads() else 0, **tiles, **LAUNCH,
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         tiles: dict | None = None) -> torch.Tensor:
    """y = x W^T (+ b) for x [..., K] of at most MAX_ROWS rows and W [N, K] (fp16/bf16/fp32): float32 products
    and sums, output in x's dtype, shape [..., N]. `tiles` overrides `gemv_config` (for sweeps)."""
    x2 = _rows("gemv", x, weight, bias)
    n = weight.shape[0]
    y = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    _launch(x2, weight, bias, y, tiles)
    return y.reshape(*x.shape[:-1], n)


def _gate_columns(fn: str, weight: torch.Tensor) -> int:
    """I, for a gate_up weight [2I, K] holding the I gate rows then the I up rows."""
    if weight.shape[0] % 2:
        raise ValueError(f"{fn}: weight of shape {tuple(weight.shape)} has an odd number of rows, {weight.shape[0]}; "
                         "it must hold I gate rows then I up rows")
    return weight.shape[0] // 2


def rms_norm_gemv(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None, tiles: dict | None = None, silu_and_mul: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`gemv(rms_norm(x, norm_weight, eps, residual), weight, bias)` in one launch, saving the boundary between a
    norm and the projection that reads it. Each program recomputes its rows' RMS from the whole of x (+ residual),
    then normalises each K chunk with `rms_norm`'s casts before its dot products; the normalised rows are never
    stored. With `residual`, returns (y, x + residual) as `rms_norm` does, the sum written by program 0 alone.
    y is in the dtype `rms_norm` returns (x's and norm_weight's promoted). With `silu_and_mul`, weight is a gate_up
    weight and y [..., I] its SiLU-and-mul, as `gemv_silu_and_mul` applies it (and reads `tiles`)."""
    fn, k = "rms_norm_gemv", x.shape[-1]
    x2 = _rows(fn, x, weight, bias)
    if tuple(norm_weight.shape) != (k,):
        raise ValueError(f"{fn}: norm_weight of shape {tuple(norm_weight.shape)} does not match x's last dim {k}")
    r2 = residual_sum = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{fn}: residual of shape {tuple(residual.shape)} does not match x's {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"{fn}: residual of dtype {residual.dtype} does not match x's {x.dtype}")
        r2 = _unit_stride(residual.reshape(-1, k))
        residual_sum = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n = _gate_columns(fn, weight) if silu_and_mul else weight.shape[0]
    y = torch.empty(x2.shape[0], n, dtype=torch.promote_types(x.dtype, norm_weight.dtype), device=x.device)
    _launch(x2, weight, bias, y, tiles, norm_weight=norm_weight.contiguous(), eps=eps, residual=r2,
            residual_sum=residual_sum, glu=silu_and_mul)
    y = y.reshape(*x.shape[:-1], n)
    return y if residual is None else (y, residual_sum.reshape(x.shape))


def gemv_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      tiles: dict | None = None) -> torch.Tensor:
    """`silu_and_mul(gemv(x, weight, bias))` in one launch, saving the boundary after the gate_up projection and
    the [.., 2I] intermediate's round trip. weight [2I, K] holds the I gate rows then the I up rows; output
    [..., I] in x's dtype, gate and up rounded to it before SiLU-and-mul as the unfused pair rounds them. `tiles`'
    BLOCK_N counts gate columns a program computes (each with its matching up columns)."""
    fn = "gemv_silu_and_mul"
    x2 = _rows(fn, x, weight, bias)
    inter = _gate_columns(fn, weight)
    y = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    _launch(x2, weight, bias, y, tiles, glu=True)
    return y.reshape(*x.shape[:-1], inter)
