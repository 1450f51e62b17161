"""Triton RMSNorm, fused with the residual add. Same signature and cast order as `reference.rms_norm`:
(x + residual) rounded to the input dtype, variance in float32, the normalised value rounded to the
input dtype before the weight multiplies it. Each program normalises a tile of rows, so a token's
result never depends on what else is in the batch.

The sum of squares is the diagonal of H H^T for a tile of rows H, an MMA chain over the row in `SUM_BLOCK`-column
steps (`inverse_rms`). A `tl.sum` would reduce in an order set by the tile's register layout, which differs between
kernels; the MMA chain's bits are the same in any tile (the property deterministic mode's matmul rests on), so a
kernel that normalises its own input (deterministic mode's `rms_norm_linear`) gets this kernel's bits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.kernels.triton.mma import dot
from parity.kernels.triton.pdl import LAUNCH, wait_for_previous

SUM_ROWS = tl.constexpr(16)  # row slots of the sum's MMA tile (tl.dot's smallest M); a program's rows past BLOCK_R are masked
SUM_BLOCK = tl.constexpr(256)  # columns per step, here and in every kernel that calls `inverse_rms`


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
def inverse_rms(x_rows, r_rows, sum_rows, row_mask, sum_cols, N, eps, HAS_RESIDUAL: tl.constexpr,
                ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """1 / RMS (float32) of ROWS rows ([ROWS, 1] pointers; rows off `row_mask` read nothing), the mean square being
    the diagonal of H H^T summed by `dot` in BLOCK-column steps (products of 16-bit values are exact in float32).
    With HAS_RESIDUAL the rows' sums x + residual go to sum_rows, their first `sum_cols` columns: N in one program of
    a grid, 0 in the others (a bound rather than a boolean mask, which the interpreter turns into an int32 one)."""
    gram = tl.zeros([ROWS, ROWS], tl.float32)
    offs = tl.arange(0, BLOCK)
    for k0 in range(0, N, BLOCK):
        cols = k0 + offs
        mask = row_mask[:, None] & (cols[None, :] < N)
        h = summed_chunk(x_rows, r_rows, cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(sum_rows + cols[None, :], h, mask=mask & (cols[None, :] < sum_cols))
        gram += dot(h, tl.trans(h))
    slot = tl.arange(0, ROWS)
    squares = tl.sum(tl.where(slot[:, None] == slot[None, :], gram, 0.0), axis=1)  # one nonzero term: exact
    return tl.rsqrt(squares / N + eps)


# Row counts are never specialised on: Triton compiles a new variant for an int equal to 1 or divisible by 16,
# and a variant first met inside a timed run (an 8192-token chunk) costs a compile of a second or more.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    num_rows, rows_per_a, stride_xa, stride_xb, stride_ra, stride_rb, eps,
    N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr,
):
    wait_for_previous()
    slot = tl.arange(0, SUM_ROWS)
    rows = tl.program_id(0) * BLOCK_R + slot
    row_mask = (slot < BLOCK_R) & (rows < num_rows)
    a = (rows // rows_per_a).to(tl.int64)[:, None]
    b = (rows % rows_per_a).to(tl.int64)[:, None]
    x_rows = x_ptr + a * stride_xa + b * stride_xb
    r_rows = res_ptr + a * stride_ra + b * stride_rb
    out_rows = rows.to(tl.int64)[:, None] * N
    inv = inverse_rms(x_rows, r_rows, res_out_ptr + out_rows, row_mask, N, N, eps, HAS_RESIDUAL,
                      SUM_ROWS, SUM_BLOCK)
    offs = tl.arange(0, SUM_BLOCK)
    for k0 in range(0, N, SUM_BLOCK):
        cols = k0 + offs
        mask = row_mask[:, None] & (cols[None, :] < N)
        h = summed_chunk(x_rows, r_rows, cols, mask, HAS_RESIDUAL)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_rows + cols[None, :],
                 scale_normalised(h.to(tl.float32), inv[:, None], w[None, :], h.dtype).to(out_ptr.dtype.element_ty),
                 mask=mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """View [..., N] as [A, B, N] without copying where strides allow (q/k heads are strided views)."""
    if t.dim() == 3:
        return t
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.reshape(-1, 1, t.shape[-1])


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, first adds it and also returns the sum."""
    n = x.shape[-1]
    x3 = _as_3d(x if x.stride(-1) == 1 else x.contiguous())
    r3 = x3 if residual is None else _as_3d(residual if residual.stride(-1) == 1 else residual.contiguous())
    num_rows = x3.shape[0] * x3.shape[1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if num_rows:
        block_r = max(1, min(SUM_ROWS.value, 4096 // triton.next_power_of_2(n)))  # more programs for wide rows
        _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
            x3, r3, weight, out, res_out,
            num_rows, x3.shape[1], x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), eps,
            N=n, HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, num_warps=4, **LAUNCH,
        )
    return out if residual is None else (out, res_out)
