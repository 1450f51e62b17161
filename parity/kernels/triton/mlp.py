"""The SwiGLU MLP's first half for a few rows (small-batch decode): the fused gate/up projection and
silu(gate) * up in one kernel, instead of a GEMM, its [rows, 2I] output in memory, and a SiLU launch.

One program owns BLOCK_N output columns: it streams the matching gate rows and up rows of the weight
[2I, K] once (the step is bound by reading weights) and multiplies them with every input row, float32
accumulation. Rounding follows the unfused path: gate and up rounded to the input dtype, SiLU in float32
rounded, then the product rounded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.kernels.triton.attention import _dot


@triton.jit(do_not_specialize=["num_rows"])
def _gate_up_silu_kernel(
    x_ptr, w_ptr, out_ptr, num_rows, stride_x, stride_w, stride_o,
    K: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows[:, None] < num_rows
    col_mask = cols[:, None] < INTER
    gate_rows = cols.to(tl.int64)[:, None] * stride_w
    up_rows = (cols + INTER).to(tl.int64)[:, None] * stride_w
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)[None, :]
        k_mask = kk < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + kk, mask=row_mask & k_mask, other=0.0)
        w_gate = tl.load(w_ptr + gate_rows + kk, mask=col_mask & k_mask, other=0.0)
        w_up = tl.load(w_ptr + up_rows + kk, mask=col_mask & k_mask, other=0.0)
        acc_gate += _dot(x, tl.trans(w_gate))
        acc_up += _dot(x, tl.trans(w_up))
    dt = out_ptr.dtype.element_ty
    gate = acc_gate.to(dt).to(tl.float32)
    up = acc_up.to(dt).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], (silu * up).to(dt), mask=row_mask & (cols[None, :] < INTER))


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) for x [..., K] with at most 16 rows and weight [2I, K] (gate rows, then up)."""
    k = x.shape[-1]
    inter = weight.shape[0] // 2
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    assert x2.shape[0] <= 16 and weight.stride(-1) == 1 and weight.shape[1] == k
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block_n = 16
    _gate_up_silu_kernel[(triton.cdiv(inter, block_n),)](
        x2, weight, out, x2.shape[0], x2.stride(0), weight.stride(0), out.stride(0),
        K=k, INTER=inter, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=min(256, triton.next_power_of_2(k)),
        num_warps=4, num_stages=4,
    )
    return out.reshape(*x.shape[:-1], inter)
