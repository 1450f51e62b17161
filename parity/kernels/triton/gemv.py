"""Matrix-vector products for fast mode's decode matmuls of very few rows (at most `MAX_ROWS`).

A tensor-core tile wastes most of its rows on a one-token batch, and with 32 output columns per program a
1024-column projection runs on only 32 programs. Here each program owns `BLOCK_N` output columns (rows of W),
walks K in `BLOCK_K` chunks, loads each W tile once and uses it for every x row: plain float32 products and sums
(no tensor cores), so the work is streaming W from memory across many programs. Whether this kernel, the narrow
matmul tile or cuBLAS serves a given (rows, weight shape) is decided by timing elsewhere; this module only
computes the product.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from parity.kernels.triton.pdl import LAUNCH, wait_for_previous

__all__ = ["MAX_ROWS", "gemv", "gemv_config"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_ROWS = 4  # rows of x after flattening its leading dims


@triton.jit
def _row_dot(w, x_row_ptr, kk, mask):
    """One x row's chunk against the [BLOCK_N, BLOCK_K] W tile (float32): BLOCK_N partial dot products."""
    x = tl.load(x_row_ptr + kk, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(w * x[None, :], axis=1)


# ROWS (the row count padded to 1, 2 or 4) is a constexpr: one compiled variant per padded count. The row count M
# itself is a runtime argument and never specialised on (Triton would compile another variant for M == 1), so 3
# rows run the 4-row variant with the fourth row masked.
@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    wait_for_previous()
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    # A row past M reads and writes nothing: its K and N bounds are 0 (bounds rather than `mask & (M > r)`, which
    # the interpreter turns into an int32 mask).
    k1, k2, k3 = tl.where(M > 1, K, 0), tl.where(M > 2, K, 0), tl.where(M > 3, K, 0)
    acc0 = tl.zeros([BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
        acc0 += _row_dot(w, x_ptr, kk, kk < K)  # M >= 1 whenever the kernel runs
        if ROWS > 1:
            acc1 += _row_dot(w, x_ptr + stride_xm, kk, kk < k1)
        if ROWS > 2:
            acc2 += _row_dot(w, x_ptr + 2 * stride_xm, kk, kk < k2)
            acc3 += _row_dot(w, x_ptr + 3 * stride_xm, kk, kk < k3)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc0 += b
        acc1 += b
        acc2 += b
        acc3 += b
    out_ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + offs_n, acc0.to(out_ty), mask=n_mask)
    if ROWS > 1:
        tl.store(y_ptr + stride_ym + offs_n, acc1.to(out_ty), mask=offs_n < tl.where(M > 1, N, 0))
    if ROWS > 2:
        tl.store(y_ptr + 2 * stride_ym + offs_n, acc2.to(out_ty), mask=offs_n < tl.where(M > 2, N, 0))
        tl.store(y_ptr + 3 * stride_ym + offs_n, acc3.to(out_ty), mask=offs_n < tl.where(M > 3, N, 0))


def _device_config(n: int, k: int, rows: int) -> dict:
    """4 output columns a program; K chunks half as deep as K at one row (at most 1024), all of K at more rows (at
    most 2048). From `benchmarks/gemv_sweep.py` on the H200, weights read from HBM as in a decode step (Qwen3-0.6B's
    projections at 1, 2 and 4 rows): a read of a few MB is latency-bound, so what counts is bytes in flight per
    program; these were the best or within 10% of it at every shape (e.g. the o projection at 2 rows 3.2 us against
    cuBLAS's 13.2), where the 8-16-column, 256-512-deep first guess ran 1.2-2x slower."""
    kp2 = triton.next_power_of_2(k)
    block_k = min(kp2 // 2, 1024) if rows == 1 else min(kp2, 2048)
    return dict(BLOCK_N=4, BLOCK_K=max(16, block_k), num_warps=4, num_stages=3)


def gemv_config(n: int, k: int, rows: int) -> dict:
    """Launch configuration for `rows` (at most MAX_ROWS) rows against an [n, k] weight. Under TRITON_INTERPRET:
    few large programs, since the CPU interpreter's cost is per program and per op."""
    if INTERPRET:
        return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1)
    return _device_config(n, k, rows)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         tiles: dict | None = None) -> torch.Tensor:
    """y = x W^T (+ b) for x [..., K] of at most MAX_ROWS rows and W [N, K] (fp16/bf16/fp32): float32 products
    and sums, output in x's dtype, shape [..., N]. `tiles` overrides `gemv_config` (for sweeps)."""
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"gemv: weight of shape {tuple(weight.shape)} does not match x's last dim {k}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {m} (x of shape {tuple(x.shape)})")
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        cfg = tiles or gemv_config(n, k, m)
        _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            x2, weight, bias if bias is not None else weight, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, ROWS=triton.next_power_of_2(m), **cfg, **LAUNCH,
        )
    return y.reshape(*x.shape[:-1], n)
