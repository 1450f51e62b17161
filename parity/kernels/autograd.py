"""Backward passes for forward-only kernels: the trainer's deterministic forward, with a backward fast enough to train.

Each function takes the forward implementation (`impl`, e.g. `parity.kernels.triton.invariant.rms_norm`) and
returns its values untouched, so a forward under autograd is bit for bit the engine's. Only the backward is
written here, in plain torch, from the op's derivative (no recomputation of a reference forward):
- RMSNorm (optionally fused with the residual add): y = h / rms(h), h = x (+ residual) in float32, out = w * y
  cast as HF casts; dh = (dy - y * mean(dy * y)) / rms(h), dw = sum(dout * y).
- RoPE: a rotation by fixed cos/sin; its adjoint rotates the gradient back: dq = g * cos + rotate_half^T(g * sin).
  Qwen3's per-head q/k RMSNorm and RoPE in one kernel (`rope_and_cache`): the rotation's adjoint, then the norm's.
- SiLU-and-mul: d gate = g * up * s (1 + gate (1 - s)), s = sigmoid(gate); d up = g * silu(gate).
- Linear: grad_x = g W, grad_W = g^T x, grad_b = sum(g), one matmul each over all rows (in float32 for the LM
  head under logits_fp32, else in x's dtype).
- Log-softmax: dx = g - exp(out) * sum(g).
- Attention over packed sequences (no KV cache): the sequences are padded into one batch and run through
  `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA) with causal and
  key-padding masks, whose backward gives dq, dk, dv (the fused kernels recompute the softmax tile by tile, as
  every flash-attention backward does).
Gradients are float32 maths rounded to the parameter dtype; they need not be batch-invariant (only the forward
values must equal the engine's) and agree with autograd through `reference.py` to rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from parity.kernels.metadata import AttentionMetadata


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ------------------------------------------------------------------------------------------- linear
class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x2, weight, bias, fp32):
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.fp32 = bias is not None, fp32
        return impl(x2, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        compute = torch.float32 if ctx.fp32 else x2.dtype
        g = grad.to(compute)
        grad_x = (g @ weight.to(compute)).to(x2.dtype) if ctx.needs_input_grad[1] else None
        grad_w = (g.t() @ x2.to(compute)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_b = g.sum(0).to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return None, grad_x, grad_w, grad_b, None


def linear(impl: Callable, x, weight, bias=None, fp32: bool = False):
    """`impl(x2, weight, bias)` on the rows x2 [N, K] of x with the analytic backward (float32 maths when `fp32`)."""
    x2 = x.reshape(-1, x.shape[-1])
    return _Linear.apply(impl, x2, weight, bias, fp32).reshape(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------------ RMSNorm
def _rms_norm_grads(h, weight, eps: float, grad_out, weight_grad: bool):
    """(d h, d weight or None) of out = weight * (h / rms(h)) over the last dimension, in float32 maths."""
    hw = _wide(h)
    inv_rms = torch.rsqrt(hw.pow(2).mean(-1, keepdim=True) + eps)
    y = hw * inv_rms
    g = _wide(grad_out)
    grad_w = (g * y.to(h.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype) if weight_grad else None
    gy = g * weight
    return (inv_rms * (gy - y * (gy * y).mean(-1, keepdim=True))).to(h.dtype), grad_w


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x, weight, eps, residual):
        ctx.eps, ctx.fused = eps, residual is not None
        if residual is None:
            out = impl(x, weight, eps)
            ctx.save_for_backward(x, weight)
            return out
        out, summed = impl(x, weight, eps, residual)
        ctx.save_for_backward(summed, weight)
        return out, summed

    @staticmethod
    def backward(ctx, grad_out, grad_summed=None):
        h, weight = ctx.saved_tensors
        grad_h, grad_w = _rms_norm_grads(h, weight, ctx.eps, grad_out, ctx.needs_input_grad[2])
        if grad_summed is not None:
            grad_h = grad_h + grad_summed
        return None, grad_h, grad_w, None, grad_h if ctx.fused else None


def rms_norm(impl: Callable, x, weight, eps: float, residual=None):
    """`impl(x, weight, eps[, residual])` with the analytic backward (output, or (output, x + residual))."""
    return _RMSNorm.apply(impl, x, weight, eps, residual)


# --------------------------------------------------------------------------------------------- RoPE
def _rotate_half_adjoint(y: torch.Tensor) -> torch.Tensor:
    """The transpose of `reference.rotate_half` (cat(-x2, x1)): cat(y2, -y1)."""
    y1, y2 = y.chunk(2, dim=-1)
    return torch.cat((y2, -y1), dim=-1)


def _rotary_adjoint(grad, cos, sin):
    """The gradient of RoPE's input from its output's (None stays None); cos/sin [T, D] for [T, heads, D]."""
    if grad is None:
        return None
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return grad * cos + _rotate_half_adjoint(grad * sin)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return impl(q, k, cos, sin)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        return None, _rotary_adjoint(grad_q, cos, sin), _rotary_adjoint(grad_k, cos, sin), None, None


def apply_rotary(impl: Callable, q, k, cos, sin):
    """`impl(q, k, cos, sin)` with the analytic backward for q and k (cos/sin are constant tables)."""
    return _Rotary.apply(impl, q, k, cos, sin)


class _NormRotary(torch.autograd.Function):
    """Per-head RMSNorm of q and k (when the weights are given), then RoPE, in one forward kernel: the backward
    rotates the gradients back, then takes them through each norm."""

    @staticmethod
    def forward(ctx, impl, q, k, v, cos, sin, q_weight, k_weight, eps):
        ctx.eps, ctx.norm = eps, q_weight is not None
        ctx.save_for_backward(q, k, cos, sin, q_weight, k_weight)
        return impl(q, k, v, cos, sin, q_weight, k_weight, eps, None, None)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        q, k, cos, sin, q_weight, k_weight = ctx.saved_tensors

        def back(x, weight, grad, weight_grad: bool):
            grad = _rotary_adjoint(grad, cos, sin)
            if not ctx.norm or grad is None:
                return grad, None
            return _rms_norm_grads(x, weight, ctx.eps, grad, weight_grad)

        grad_q, grad_q_weight = back(q, q_weight, grad_q, ctx.needs_input_grad[6])
        grad_k, grad_k_weight = back(k, k_weight, grad_k, ctx.needs_input_grad[7])
        return None, grad_q, grad_k, None, None, None, grad_q_weight, grad_k_weight, None


def rope_and_cache(impl: Callable, q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping):
    """`impl`'s one-kernel q/k norm + RoPE (+ cache write): differentiable for the trainer (no cache); with the
    engine's paged cache it is the forward alone."""
    if kv_cache is not None:
        return impl(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping)
    return _NormRotary.apply(impl, q, k, v, cos, sin, q_weight, k_weight, eps)


# ------------------------------------------------------------------------------------- SiLU and mul
class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, x):
        ctx.save_for_backward(x)
        return impl(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gate, up = _wide(x).chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        g = _wide(grad)
        grad_gate = g * up * s * (1 + gate * (1 - s))
        return None, torch.cat((grad_gate, g * gate * s), dim=-1).to(x.dtype)


def silu_and_mul(impl: Callable, x):
    return _SiluAndMul.apply(impl, x)


# -------------------------------------------------------------------------------------- log-softmax
class _LogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, logits):
        out = impl(logits)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return None, grad - torch.exp(out) * grad.sum(dim=-1, keepdim=True)


def log_softmax(impl: Callable, logits):
    return _LogSoftmax.apply(impl, logits)


# ---------------------------------------------------------------------------------------- attention
def padded_attention(q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention within each packed sequence, through SDPA on the sequences padded into a batch.

    q [T, H, D], k/v [T, KV, D] (GQA: each KV head serves H / KV query heads) -> [T, H, D]."""
    lens = torch.tensor(meta.seq_lens_cpu, device=q.device)
    starts = torch.tensor(meta.query_start_loc_cpu[:-1], device=q.device)
    num_seqs, longest = len(meta.seq_lens_cpu), meta.max_query_len
    seq = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), lens)
    pos = torch.arange(q.shape[0], device=q.device) - starts[seq]

    def pad(t):  # [T, heads, D] -> [B, heads, L, D]
        out = t.new_zeros(num_seqs, longest, *t.shape[1:])
        return out.index_put((seq, pos), t).transpose(1, 2)

    group = q.shape[1] // k.shape[1]
    kp, vp = (pad(t).repeat_interleave(group, dim=1) for t in (k, v))
    cols = torch.arange(longest, device=q.device)
    mask = (cols[None, :] <= cols[:, None])[None] & (cols[None, None, :] < lens[:, None, None])  # [B, L, L]
    out = F.scaled_dot_product_attention(pad(q), kp, vp, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)[seq, pos]


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, q, k, v, meta, scale):
        ctx.meta, ctx.scale = meta, scale
        ctx.save_for_backward(q, k, v)
        return impl(q, k, v, None, meta, scale)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = padded_attention(*inputs, ctx.meta, ctx.scale)
        grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
        return None, *grads, None, None


def packed_attention(impl: Callable, q, k, v, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """`impl(q, k, v, None, meta, scale)` (no KV cache: the trainer's packed batch) with SDPA's backward."""
    return _PackedAttention.apply(impl, q, k, v, meta, scale)


def attention(impl: Callable, q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """`impl`'s attention: differentiable over the packed trainer batch (no cache); over the engine's paged
    cache it is the forward alone."""
    if kv_cache is not None:
        return impl(q, k, v, kv_cache, meta, scale)
    return packed_attention(impl, q, k, v, meta, scale)


WRAPPERS: dict[str, Callable] = {"rms_norm": rms_norm, "apply_rotary": apply_rotary, "silu_and_mul": silu_and_mul,
                                 "attention": attention, "log_softmax": log_softmax}


def with_backward(forward: ModuleType, *names: str) -> tuple[Callable, ...]:
    """The ops `names` (of WRAPPERS) of a forward-only kernel module (same signatures, same forward values), in
    that order, each with its analytic backward above."""
    return tuple(functools.partial(WRAPPERS[name], getattr(forward, name)) for name in names)
