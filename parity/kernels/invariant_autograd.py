"""Deterministic mode on CPU under autograd (the trainer's parity forward): the forward values are the
batch-invariant kernels' of `invariant.py`, bit for bit; the backward is the analytic one of
`parity/kernels/autograd.py`, as on CUDA (`triton/invariant_autograd.py`).

Why not autograd through the per-row forward: every row of a per-row linear then gets its own weight gradient,
a full [out, in] outer product summed into the weight's, so a backward costs rows x parameters (SmolLM2-135M:
one TRL step of two completions took 11 minutes). Batched matmuls give the same gradients to rounding; only the
forward values must equal the engine's. Mixture-of-experts layers keep autograd through `invariant.fused_moe`.
"""

from __future__ import annotations

import torch

from parity.kernels import autograd, invariant, reference
from parity.kernels.invariant import fused_moe, gumbel_argmax, moe_route

__all__ = ["apply_rotary", "attention", "fused_moe", "gumbel_argmax", "linear", "linear_fp32", "log_softmax",
           "moe_route", "rms_norm", "rope_and_cache", "silu_and_mul"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return autograd.linear(invariant.linear, x, weight, bias)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`invariant.linear_fp32` (float32 operands, products, sums and output), float32 gradients."""
    return autograd.linear(invariant.linear, x.float(), weight.float(), None, fp32=True)


rms_norm, apply_rotary, silu_and_mul, attention, log_softmax = autograd.with_backward(
    invariant, "rms_norm", "apply_rotary", "silu_and_mul", "attention", "log_softmax")
rope_and_cache = reference.rope_and_cache_from(rms_norm, apply_rotary, reference.store_kvcache)
