"""Fast mode on CUDA without autograd: Triton kernels for the norm, RoPE (fused with the per-head q/k norm
and the KV-cache write), SiLU, attention, sampling and the MoE routing and experts (`moe.py`); cuBLAS (torch)
for the matmuls and the log-softmax; for a few rows (small-batch decode), the MLP's gate/up projection and
SiLU in one kernel (`mlp.py`).
Same signatures as `reference.py`."""

from __future__ import annotations

import torch

from parity.kernels import reference
from parity.kernels.reference import linear, log_softmax
from parity.kernels.triton import mlp
from parity.kernels.triton.attention import attention
from parity.kernels.triton.elementwise import apply_rotary, rope_and_cache, silu_and_mul
from parity.kernels.triton.moe import fused_moe, moe_route
from parity.kernels.triton.norm import rms_norm
from parity.kernels.triton.sampling import gumbel_argmax

__all__ = ["apply_rotary", "attention", "fused_moe", "gate_up_silu", "gumbel_argmax", "linear", "linear_fp32",
           "log_softmax", "moe_route", "rms_norm", "rope_and_cache", "silu_and_mul"]

# Up to this many rows the gate/up projection and SiLU run as one kernel (0: always cuBLAS, then SiLU). At a
# batch of one the step is a chain of small kernels; beyond a few rows cuBLAS's tiles win.
FUSED_MLP_MAX_ROWS = 4

_MM_OUT_DTYPE = [True]  # torch.mm(out_dtype=) on CUDA exists from torch 2.8; older builds upcast instead


def mm_fp32_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T from fp16/bf16 operands with float32 accumulation and output (cuBLAS, no fp32 weight copy)."""
    if _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).reshape(*x.shape[:-1], -1)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    return reference.linear_fp32(x, weight)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with float32 products, sums and output: the same maths as upcasting both first,
    without materialising a float32 copy of the weight (600 MB for a 151936 x 1024 LM head)."""
    if x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16):
        return mm_fp32_out(x, weight)
    return reference.linear_fp32(x, weight)


def gate_up_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up of the fused gate/up projection (`reference.silu_and_mul(linear(...))`)."""
    rows = x.numel() // x.shape[-1]
    if bias is None and 0 < rows <= FUSED_MLP_MAX_ROWS and x.dtype == weight.dtype and x.dtype in (
            torch.float16, torch.bfloat16):
        return mlp.gate_up_silu(x, weight)
    return silu_and_mul(linear(x, weight, bias))
