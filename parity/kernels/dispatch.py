"""The kernel set a model calls, and the one table that picks each call's implementation.

A call's implementation follows from three things: the mode (`fast`, or `deterministic`: batch-invariant,
a token's result does not depend on what else is in the batch), the device of its tensors (Triton runs
CUDA tensors; CPU tensors, or CUDA without Triton, take plain torch) and whether autograd must see the
call (a trainer-side forward: fast mode then runs the torch reference; deterministic mode wraps the same
forward kernels with a backward). Every implementation is a module with the same functions, signatures
as in `reference.py`. Every module of a model holds the same `Kernels` instance, so flipping the mode on
the model flips it everywhere.

Beside the table, `Kernels.fused_small_batch` (`EngineConfig.fused_small_batch`) lets fast mode on CUDA run a
forward of at most 16 tokens with each RMSNorm fused into the projection after it and SiLU-and-mul into the down
projection (`triton/small_batch.py`); `Kernels.fuses_small_batch` says whether a forward may.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
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
SMALL_BATCH = "parity.kernels.triton.small_batch"
SMALL_BATCH_MAX_ROWS = 16  # tokens of a forward up to which `fused_small_batch` applies (its kernels' BLOCK_M)


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


@dataclass
class Kernels:
    deterministic: bool = False
    fused_small_batch: bool = False  # set before CUDA graphs are captured: they keep the kernels they saw

    @property
    def mode(self) -> Mode:
        return "deterministic" if self.deterministic else "fast"

    def fuses_small_batch(self, x: torch.Tensor) -> bool:
        """Whether a forward over the hidden states `x` [T, H] runs `norm_linear` / `silu_mul_linear`: asked for,
        fast mode (deterministic mode keeps its batch-invariant kernels), Triton on x's device, at most 16 tokens
        (T is fixed when a CUDA graph is captured) and no autograd (the fused kernels have no backward)."""
        return (self.fused_small_batch and not self.deterministic and x.shape[0] <= SMALL_BATCH_MAX_ROWS
                and device_kind(x) == "cuda" and not torch.is_grad_enabled())

    def norm_linear(self, x, residual, norm_weight, eps, weight, bias=None):
        """(RMSNorm(x + residual) @ weight^T (+ bias), x + residual) in one kernel (x itself without a residual);
        only where `fuses_small_batch`."""
        return _module(SMALL_BATCH).norm_linear(x, residual, norm_weight, eps, weight, bias)

    def silu_mul_linear(self, gate_up, weight, bias=None):
        """(silu(gate) * up) @ weight^T (+ bias) in one kernel; only where `fuses_small_batch`."""
        return _module(SMALL_BATCH).silu_mul_linear(gate_up, weight, bias)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return implementation(self.mode, x, weight, bias).linear(x, weight, bias)

    def linear_fp32(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T with float32 products, sums and output (the LM head under logits_fp32)."""
        return implementation(self.mode, x, weight).linear_fp32(x, weight)

    def rms_norm(self, x, weight, eps, residual=None):
        return implementation(self.mode, x, weight, residual).rms_norm(x, weight, eps, residual)

    def apply_rotary(self, q, k, cos, sin):
        return implementation(self.mode, q, k, cos, sin).apply_rotary(q, k, cos, sin)

    def silu_and_mul(self, x):
        return implementation(self.mode, x).silu_and_mul(x)

    def rope_and_cache(self, q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping):
        """Per-head RMSNorm of q and k (when the weights are given), RoPE, and k/v written into the paged cache
        (if any); returns the rotated (q, k)."""
        impl = implementation(self.mode, q, k, v, cos, sin, q_weight, k_weight)
        return impl.rope_and_cache(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping)

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
