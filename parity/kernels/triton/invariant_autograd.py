"""Deterministic mode on CUDA under autograd (the trainer's parity forward): the forward values are the
batch-invariant kernels' of `triton/invariant.py`, bit for bit; the matmul and log-softmax have their
analytic backward, the other ops recompute the torch reference under autograd in backward. Only the
forward values need to be bitwise equal to the engine's; gradients agree with the reference to rounding."""

from __future__ import annotations

import torch

from parity.kernels import reference
from parity.kernels.metadata import AttentionMetadata
from parity.kernels.triton import invariant
from parity.kernels.triton.invariant import gumbel_argmax

__all__ = ["apply_rotary", "attention", "gumbel_argmax", "linear", "linear_fp32", "log_softmax", "rms_norm",
           "silu_and_mul"]


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


class _RecomputeBackward(torch.autograd.Function):
    """Forward by a Triton kernel; backward by autograd through the torch reference, recomputed."""

    @staticmethod
    def forward(ctx, kernel, ref, *tensors):
        ctx.ref = ref
        ctx.save_for_backward(*tensors)
        return kernel(*tensors)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.ref(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        wrt = [t for t in inputs if t is not None and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
        return (None, None, *[next(found) if t is not None and t.requires_grad else None for t in inputs])


def rms_norm(x, weight, eps, residual=None):
    if residual is None:
        return _RecomputeBackward.apply(lambda x_, w_: invariant.rms_norm(x_, w_, eps),
                                        lambda x_, w_: reference.rms_norm(x_, w_, eps), x, weight)
    return _RecomputeBackward.apply(lambda x_, w_, r_: invariant.rms_norm(x_, w_, eps, r_),
                                    lambda x_, w_, r_: reference.rms_norm(x_, w_, eps, r_), x, weight, residual)


def apply_rotary(q, k, cos, sin):
    return _RecomputeBackward.apply(invariant.apply_rotary, reference.apply_rotary, q, k, cos, sin)


def silu_and_mul(x):
    return _RecomputeBackward.apply(invariant.silu_and_mul, reference.silu_and_mul, x)


def attention(q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The packed trainer batch (no cache) is differentiable; the paged cache path is the engine's, forward only."""
    if kv_cache is not None:
        return invariant.attention(q, k, v, kv_cache, meta, scale)
    return _RecomputeBackward.apply(lambda q_, k_, v_: invariant.attention(q_, k_, v_, None, meta, scale),
                                    lambda q_, k_, v_: reference.varlen_attention(q_, k_, v_, meta, scale), q, k, v)


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
