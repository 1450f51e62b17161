"""Fast mode on CUDA without autograd: Triton kernels for the norm, RoPE (fused with the per-head q/k norm
and the KV-cache write), SiLU, attention, sampling and the MoE routing and experts (`moe.py`); cuBLAS (torch)
for the matmuls and the log-softmax.
Same signatures as `reference.py`."""

from __future__ import annotations

import torch

from parity.kernels import reference
from parity.kernels.reference import linear, log_softmax
from parity.kernels.triton.attention import attention
from parity.kernels.triton.elementwise import apply_rotary, rope_and_cache, silu_and_mul
from parity.kernels.triton.moe import fused_moe, moe_route
from parity.kernels.triton.norm import rms_norm
from parity.kernels.triton.sampling import gumbel_argmax

__all__ = ["apply_rotary", "attention", "fused_moe", "gumbel_argmax", "linear", "linear_fp32", "log_softmax",
           "moe_route", "rms_norm", "rope_and_cache", "silu_and_mul"]

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
