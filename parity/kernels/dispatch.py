"""The kernel set a model calls, and the one table that picks each call's implementation.

A call's implementation follows from three things: the mode (`fast`, or `deterministic`: batch-invariant,
a token's result does not depend on what else is in the batch), the device of its tensors (Triton runs
CUDA tensors; CPU tensors, or CUDA without Triton, take plain torch) and whether autograd must see the
call (a trainer-side forward: fast mode then runs the torch reference; deterministic mode wraps the same
forward kernels with a backward). Every implementation is a module with the same functions, signatures
as in `reference.py`. Every module of a model holds the same `Kernels` instance, so flipping the mode on
the model flips it everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

from parity.kernels.metadata import AttentionMetadata

Mode = Literal["fast", "deterministic"]
Device = Literal["cpu", "cuda"]

# (mode, device, autograd) -> the module that implements every op there.
IMPLEMENTATIONS: dict[tuple[Mode, Device, bool], str] = {
    ("fast", "cpu", False): "parity.kernels.reference",
    ("fast", "cpu", True): "parity.kernels.reference",
    ("fast", "cuda", False): "parity.kernels.triton.fast",
    ("fast", "cuda", True): "parity.kernels.reference",
    ("deterministic", "cpu", False): "parity.kernels.invariant",
    ("deterministic", "cpu", True): "parity.kernels.invariant_autograd",
    ("deterministic", "cuda", False): "parity.kernels.triton.invariant",
    ("deterministic", "cuda", True): "parity.kernels.triton.invariant_autograd",
}

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def device_kind(x: torch.Tensor) -> Device:
    """"cuda" where the Triton kernels can run (tests patch this to run them in Triton's CPU interpreter)."""
    return "cuda" if x.is_cuda and HAVE_TRITON else "cpu"


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.cache
def _module(name: str) -> ModuleType:
    """Imported on first use, so CPU runs never import Triton."""
    return importlib.import_module(name)


def implementation(mode: Mode, *tensors: torch.Tensor | None) -> ModuleType:
    """The module that runs an op on `tensors` (the first one's device decides) in `mode`."""
    return _module(IMPLEMENTATIONS[(mode, device_kind(tensors[0]), needs_grad(*tensors))])


def gumbel_argmax(logprobs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The sampler's Gumbel-max (`reference.gumbel_argmax`). Integer hashing and float64 maths give the
    same bits in every implementation, so the mode does not enter; on CUDA one fused kernel makes the
    noise in registers (the float64 [B, V] tensors cost ~1 GB of traffic at B=256, V=152k)."""
    return implementation("fast", logprobs).gumbel_argmax(logprobs, seeds, steps)


def dependent_launches(enabled: bool = True) -> contextlib.AbstractContextManager:
    """A block whose Triton kernels launch with programmatic dependent launch (`triton/pdl.py`; Hopper and later):
    each kernel starts while the previous one drains, then waits for it. A no-op without Triton or when not enabled."""
    if not (enabled and HAVE_TRITON and torch.cuda.is_available()):
        return contextlib.nullcontext()
    return _module("parity.kernels.triton.pdl").dependent_launches()


def norm_then_linear(rms_norm: Callable, linear: Callable, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None):
    """linear(rms_norm(x, norm_weight, eps, residual), weight, bias) from the given ops, returned as rms_norm returns:
    y, or (y, x + residual) with a residual. The unfused `rms_norm_linear`."""
    normed = rms_norm(x, norm_weight, eps, residual)
    if residual is None:
        return linear(normed, weight, bias)
    h, summed = normed
    return linear(h, weight, bias), summed


@dataclass
class Kernels:
    deterministic: bool = False

    @property
    def mode(self) -> Mode:
        return "deterministic" if self.deterministic else "fast"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return implementation(self.mode, x, weight, bias).linear(x, weight, bias)

    def linear_fp32(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T with float32 products, sums and output (the LM head under logits_fp32)."""
        return implementation(self.mode, x, weight).linear_fp32(x, weight)

    def linear_silu_and_mul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        """silu_and_mul(linear(x, weight, bias)) for a gate_up weight [2I, K] (gate rows, then up rows). An
        implementation may fuse the two (fast mode's few-row GEMV); the others run the pair, op by op as before."""
        fused = getattr(implementation(self.mode, x, weight, bias), "linear_silu_and_mul", None)
        if fused is not None:
            return fused(x, weight, bias)
        return self.silu_and_mul(self.linear(x, weight, bias))

    def rms_norm(self, x, weight, eps, residual=None):
        return implementation(self.mode, x, weight, residual).rms_norm(x, weight, eps, residual)

    def rms_norm_linear(self, x, norm_weight, eps, weight, bias=None, residual=None, silu_and_mul: bool = False):
        """linear(rms_norm(x, norm_weight, eps, residual), weight, bias), or with `silu_and_mul` linear_silu_and_mul
        of the normalised x (weight a gate_up weight); returns y, or (y, x + residual) with a residual, as rms_norm
        does. An implementation may fuse them (fast mode's few-row GEMV with the norm as its prologue); the others
        run this object's rms_norm, then its linear or linear_silu_and_mul: the same ops and bits as calling them."""
        fused = getattr(implementation(self.mode, x, norm_weight, weight, bias, residual), "rms_norm_linear", None)
        if fused is not None:
            return fused(x, norm_weight, eps, weight, bias, residual, silu_and_mul)
        linear = self.linear_silu_and_mul if silu_and_mul else self.linear
        return norm_then_linear(self.rms_norm, linear, x, norm_weight, eps, weight, bias, residual)

    def apply_rotary(self, q, k, cos, sin):
        return implementation(self.mode, q, k, cos, sin).apply_rotary(q, k, cos, sin)

    def silu_and_mul(self, x):
        return implementation(self.mode, x).silu_and_mul(x)

    def rope_and_cache(self, q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping):
        """Per-head RMSNorm of q and k (when the weights are given), RoPE, and k/v written into the paged cache
        (if any); returns the rotated (q, k)."""
        impl = implementation(self.mode, q, k, v, cos, sin, q_weight, k_weight)
        return impl.rope_and_cache(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping)

    def rope_and_attention(self, q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, meta: AttentionMetadata,
                           scale: float) -> torch.Tensor:
        """`rope_and_cache`, then `attention` of the rotated q and k. An implementation may fuse them (fast mode's
        decode step: its attention kernel rotates the query and writes the step's key and value); the others run
        this object's two ops."""
        fused = getattr(implementation(self.mode, q, k, v, cos, sin, q_weight, k_weight), "rope_and_attention", None)
        if fused is not None:
            return fused(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, meta, scale)
        q, k = self.rope_and_cache(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, meta.slot_mapping)
        return self.attention(q, k, v, kv_cache, meta, scale)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attend over the paged cache (`rope_and_cache` wrote this step's k/v) or, without a cache, causally
        within each packed sequence."""
        return implementation(self.mode, q, k, v).attention(q, k, v, kv_cache, meta, scale)

    def moe_route(self, router_logits, top_k: int, renormalize: bool, chosen=None):
        """(weights [T, k], expert ids [T, k]) from router logits [T, E]; `chosen` replays given experts."""
        return implementation(self.mode, router_logits).moe_route(router_logits, top_k, renormalize, chosen)

    def fused_moe(self, x, gate_up, down, topk_weights, topk_ids):
        """The mixture-of-experts output [T, H]: each token's experts' SwiGLU MLPs, weighted and summed."""
        return implementation(self.mode, x, gate_up, down, topk_weights).fused_moe(
            x, gate_up, down, topk_weights, topk_ids)

    def log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """log-softmax over the vocabulary of float32 logits [N, V] (the sampler's and the trainer's)."""
        return implementation(self.mode, logits).log_softmax(logits)

    def argmax_logprob(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's argmax of float32 logits [N, V] (int64, the first of tied maxima) and its value in
        `log_softmax(logits)`: a greedy sample. An implementation may compute both in one pass over the logits
        (Triton: without writing the [N, V] log-softmax; deterministic mode's gives log_softmax's bits, fast mode's the
        same kernels' values, within 1e-6 of torch's); the others take them from log_softmax."""
        fused = getattr(implementation(self.mode, logits), "argmax_logprob", None)
        if fused is not None:
            return fused(logits)
        tokens = logits.argmax(dim=-1)
        return tokens, self.log_softmax(logits).gather(-1, tokens[:, None])[:, 0]
