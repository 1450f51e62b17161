"""Deterministic mode on CUDA under autograd (the trainer's parity forward): the forward values are the
batch-invariant kernels' of `triton/invariant.py`, bit for bit; every op has an analytic backward
(`parity/kernels/autograd.py`; `parity/kernels/invariant_autograd.py` does the same for the CPU kernels). Only
the forward values need to be bitwise equal to the engine's; gradients agree with the reference to rounding."""

from __future__ import annotations

import functools

import torch

from parity.kernels import autograd, reference
from parity.kernels.triton import invariant
from parity.kernels.triton.attention import store_kvcache
from parity.kernels.triton.elementwise import fuses
from parity.kernels.triton.invariant import gumbel_argmax, moe_route
from parity.kernels.triton.moe import fused_moe_autograd as fused_moe

__all__ = ["apply_rotary", "attention", "fused_moe", "gumbel_argmax", "linear", "linear_fp32", "log_softmax",
           "moe_route", "rms_norm",
           "rope_and_cache", "silu_and_mul"]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp32: bool) -> torch.Tensor:
    if fp32 and x.dtype != weight.dtype:
        x, weight = x.float(), weight.float()
    return autograd.linear(functools.partial(invariant.linear, fp32=fp32), x, weight, bias, fp32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _linear(x, weight, bias, fp32=False)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _linear(x, weight, None, fp32=True)


rms_norm, apply_rotary, silu_and_mul, attention, log_softmax = autograd.with_backward(
    invariant, "rms_norm", "apply_rotary", "silu_and_mul", "attention", "log_softmax")
_separate_rope_and_cache = reference.rope_and_cache_from(rms_norm, apply_rotary, store_kvcache)


def rope_and_cache(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping):
    """The engine's choice, with a backward: its one kernel where it fuses (one dtype), else the separate kernels."""
    if fuses(q, k, v, cos, q_weight, k_weight):
        return autograd.rope_and_cache(invariant.rope_and_cache, q, k, v, cos, sin, q_weight, k_weight, eps,
                                       kv_cache, slot_mapping)
    return _separate_rope_and_cache(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping)
