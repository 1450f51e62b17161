"""Deterministic mode on CUDA under autograd (the trainer's parity forward): the forward values are the
batch-invariant kernels' of `triton/invariant.py`, bit for bit; every op has an analytic backward (the matmul
and log-softmax here, RMSNorm, RoPE, SiLU-and-mul and packed attention in `parity/kernels/autograd.py`). Only
the forward values need to be bitwise equal to the engine's; gradients agree with the reference to rounding."""

from __future__ import annotations

import torch

from parity.kernels import autograd, reference
from parity.kernels.metadata import AttentionMetadata
from parity.kernels.triton import invariant
from parity.kernels.triton.attention import store_kvcache
from parity.kernels.triton.invariant import gumbel_argmax, moe_route
from parity.kernels.triton.moe import fused_moe_autograd as fused_moe

__all__ = ["apply_rotary", "attention", "fused_moe", "gumbel_argmax", "linear", "linear_fp32", "log_softmax",
           "moe_route", "rms_norm",
           "rope_and_cache", "silu_and_mul"]


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, fp32):
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.fp32 = bias is not None, fp32
        return invariant.linear(x2, weight, bias, fp32)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        compute = torch.float32 if ctx.fp32 else x2.dtype
        g = grad.to(compute)
        grad_x = (g @ weight.to(compute)).to(x2.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.t() @ x2.to(compute)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp32: bool) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if fp32 and x2.dtype != weight.dtype:
        x2, weight = x2.float(), weight.float()
    return _Linear.apply(x2, weight, bias, fp32).reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(x, weight, bias, fp32=False)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _linear(x, weight, None, fp32=True)


def rms_norm(x, weight, eps, residual=None):
    return autograd.rms_norm(invariant.rms_norm, x, weight, eps, residual)


def apply_rotary(q, k, cos, sin):
    return autograd.apply_rotary(invariant.apply_rotary, q, k, cos, sin)


def silu_and_mul(x):
    return autograd.silu_and_mul(invariant.silu_and_mul, x)


def attention(q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The packed trainer batch (no cache) is differentiable; the paged cache path is the engine's, forward only."""
    if kv_cache is not None:
        return invariant.attention(q, k, v, kv_cache, meta, scale)
    return autograd.packed_attention(invariant.attention, q, k, v, meta, scale)


rope_and_cache = reference.rope_and_cache_from(rms_norm, apply_rotary, store_kvcache)


class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        out = invariant.log_softmax(logits)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad - torch.exp(out) * grad.sum(dim=-1, keepdim=True)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return _LogSoftmax.apply(logits)
