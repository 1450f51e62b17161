"""Triton RMSNorm, fused with the residual add. Same signature and cast order as `reference.rms_norm`:
(x + residual) rounded to the input dtype, variance in float32, the normalised value rounded to the
input dtype before the weight multiplies it. Each program normalises a tile of rows, so a token's
result never depends on what else is in the batch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.kernels.triton.pdl import LAUNCH, wait_for_previous


@triton.jit
def scale_normalised(h, inv, w, dt: tl.constexpr):
    """w * (h * inv) in float32, the normalised value rounded to `dt` first (`reference.rms_norm`'s cast order;
    the caller rounds the product). h, inv and w in float32."""
    return w * (h * inv).to(dt).to(tl.float32)


# Row counts are never specialised on: Triton compiles a new variant for an int equal to 1 or divisible by 16,
# and a variant first met inside a timed run (an 8192-token chunk) costs a compile of a second or more.
@triton.jit(do_not_specialize=["num_rows"])
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    num_rows, rows_per_a, stride_xa, stride_xb, stride_ra, stride_rb, eps,
    N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    wait_for_previous()
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    a = (rows // rows_per_a).to(tl.int64)[:, None]
    b = (rows % rows_per_a).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = (rows[:, None] < num_rows) & (cols < N)
    x = tl.load(x_ptr + a * stride_xa + b * stride_xb + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + a * stride_ra + b * stride_rb + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(res_out_ptr + rows.to(tl.int64)[:, None] * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols,
             scale_normalised(h, inv[:, None], w, x.dtype).to(out_ptr.dtype.element_ty), mask=mask)


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
        block_n = triton.next_power_of_2(n)
        block_r = max(1, min(16, 4096 // block_n))
        _rms_norm_kernel[(triton.cdiv(num_rows, block_r),)](
            x3, r3, weight, out, res_out,
            num_rows, x3.shape[1], x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), eps,
            N=n, HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_N=block_n,
            num_warps=4 if block_n * block_r <= 4096 else 8, **LAUNCH,
        )
    return out if residual is None else (out, res_out)
