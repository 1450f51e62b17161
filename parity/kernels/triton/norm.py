"""Triton RMSNorm, fused with the residual add. Same signature and cast order as `reference.rms_norm`:
(x + residual) rounded to the input dtype, variance in float32, the normalised value rounded to the
input dtype before the weight multiplies it. Each program normalises a tile of rows, so a token's
result never depends on what else is in the batch.

With `fixed_order` (deterministic mode) the sum of squares does not follow the tile's register layout, as a `tl.sum`
does: squares accumulate elementwise over `SUM_BLOCK`-column steps, then the step's columns are added in pairs,
halving (`inverse_rms`). Any kernel that takes its rows' 1 / RMS so gets this kernel's bits: deterministic mode's
matmul normalises its own input that way (`invariant.rms_norm_linear`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.kernels.triton.pdl import LAUNCH, wait_for_previous

SUM_BLOCK = tl.constexpr(256)  # columns per step of a fixed-order sum of squares, in every kernel that takes one
SUM_LEVELS = tl.constexpr(8)  # log2(SUM_BLOCK): the pairwise additions that end it


@triton.jit
def scale_normalised(h, inv, w, dt: tl.constexpr):
    """w * (h * inv) in float32, the normalised value rounded to `dt` first (`reference.rms_norm`'s cast order;
    the caller rounds the product). h, inv and w in float32."""
    return w * (h * inv).to(dt).to(tl.float32)


@triton.jit
def summed_chunk(x_rows, r_rows, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """Columns `cols` of the rows at x_rows ([rows, 1] pointers) in x's dtype; with HAS_RESIDUAL, x + residual
    rounded to it (`reference.rms_norm`'s sum)."""
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def pairwise_row_sum(t, ROWS: tl.constexpr):
    """Row sums of t [ROWS, SUM_BLOCK]: columns 2j and 2j + 1 added, SUM_LEVELS times. Each addition takes two
    named values, so the order is the code's, not the register layout's."""
    for level in tl.static_range(SUM_LEVELS):
        even, odd = tl.split(tl.reshape(t, [ROWS, SUM_BLOCK >> (level + 1), 2]))
        t = even + odd
    return tl.reshape(t, [ROWS])


@triton.jit
def inverse_rms(x_rows, r_rows, sum_rows, row_mask, sum_cols, N, eps, HAS_RESIDUAL: tl.constexpr,
                ROWS: tl.constexpr):
    """1 / RMS (float32) of ROWS rows ([ROWS, 1] pointers; rows off `row_mask` read nothing) in a fixed order:
    float32 squares accumulated elementwise over SUM_BLOCK-column steps, then `pairwise_row_sum`. With HAS_RESIDUAL
    the rows' sums x + residual go to sum_rows, their first `sum_cols` columns: N in one program of a grid, 0 in the
    others (a bound rather than a boolean mask, which the interpreter turns into an int32 one)."""
    squares = tl.zeros([ROWS, SUM_BLOCK], tl.float32)
    offs = tl.arange(0, SUM_BLOCK)
    for k0 in range(0, N, SUM_BLOCK):
        cols = k0 + offs
        mask = row_mask[:, None] & (cols[None, :] < N)
        h = summed_chunk(x_rows, r_rows, cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(sum_rows + cols[None, :], h, mask=mask & (cols[None, :] < sum_cols))
        h = h.to(tl.float32)
        squares += h * h
    return tl.rsqrt(pairwise_row_sum(squares, ROWS) / N + eps)


# Row counts are never specialised on: Triton compiles a new variant for an int equal to 1 or divisible by 16,
# and a variant first met inside a timed run (an 8192-token chunk) costs a compile of a second or more.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    num_rows, rows_per_a, stride_xa, stride_xb, stride_ra, stride_rb, eps,
    N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FIXED_ORDER: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """A tile of BLOCK_R rows: the whole row at once (BLOCK_N columns), or with FIXED_ORDER `inverse_rms` and then
    the normalised rows in SUM_BLOCK-column steps."""
    wait_for_previous()
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    a = (rows // rows_per_a).to(tl.int64)[:, None]
    b = (rows % rows_per_a).to(tl.int64)[:, None]
    x_rows = x_ptr + a * stride_xa + b * stride_xb
    r_rows = res_ptr + a * stride_ra + b * stride_rb
    out_rows = rows.to(tl.int64)[:, None] * N
    if FIXED_ORDER:
        inv = inverse_rms(x_rows, r_rows, res_out_ptr + out_rows, rows < num_rows, N, N, eps, HAS_RESIDUAL,
                          BLOCK_R)[:, None]
        offs = tl.arange(0, SUM_BLOCK)
        for k0 in range(0, N, SUM_BLOCK):
            cols = k0 + offs
            mask = (rows[:, None] < num_rows) & (cols[None, :] < N)
            x = summed_chunk(x_rows, r_rows, cols, mask, HAS_RESIDUAL)
            w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_rows + cols[None, :],
                     scale_normalised(x.to(tl.float32), inv, w, x.dtype).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        cols = tl.arange(0, BLOCK_N)
        mask = (rows[:, None] < num_rows) & (cols[None, :] < N)
        x = summed_chunk(x_rows, r_rows, cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(res_out_ptr + out_rows + cols[None, :], x, mask=mask)
        h = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_rows + cols[None, :],
                 scale_normalised(h, inv[:, None], w[None, :], x.dtype).to(out_ptr.dtype.element_ty), mask=mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """View [..., N] as [A, B, N] without copying where strides allow (q/k heads are strided views)."""
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.reshape(-1, 1, t.shape[-1])


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, fixed_order: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, first adds it and also returns the sum. `fixed_order`: the sum
    of squares whose bits other kernels can repeat (`inverse_rms`)."""
    n = x.shape[-1]
    x3 = _as_3d(x if x.stride(-1) == 1 else x.contiguous())
    r3 = x3 if residual is None else _as_3d(residual if residual.stride(-1) == 1 else residual.contiguous())
    num_rows = x3.shape[0] * x3.shape[1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if num_rows:
        block_n = triton.next_power_of_2(n)
        block_r = max(1, min(16, 4096 // block_n))
        _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
            x3, r3, weight, out, res_out,
            num_rows, x3.shape[1], x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), eps,
            N=n, HAS_RESIDUAL=residual is not None, FIXED_ORDER=fixed_order, BLOCK_R=block_r, BLOCK_N=block_n,
            num_warps=4 if block_n * block_r <= 4096 else 8, **LAUNCH,
        )
    return out if residual is None else (out, res_out)
