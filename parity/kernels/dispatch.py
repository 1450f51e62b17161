"""The kernel set a model calls, dispatched per call.

`Kernels` picks each op's implementation from the tensor's device (Triton on CUDA, the plain-torch
reference in `reference.py` elsewhere) and from `deterministic` (batch-invariant implementations,
whose results for a token do not depend on what else is in the batch). Every module of a model
holds the same `Kernels` instance, so flipping the mode on the model flips it everywhere.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parity.kernels import invariant, reference
from parity.kernels.metadata import AttentionMetadata

HAVE_TRITON = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    from parity.kernels.triton import attention as triton_attention
    from parity.kernels.triton import elementwise as triton_elementwise
    from parity.kernels.triton import norm as triton_norm


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors in inference; the autograd path (trainer forward) stays on torch."""
    x = tensors[0]
    if not (HAVE_TRITON and x.is_cuda):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


_MM_OUT_DTYPE = [True]  # torch.mm(out_dtype=) on CUDA exists from torch 2.8; older builds upcast instead


def _mm_fp32_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T from fp16/bf16 operands with float32 accumulation and output (cuBLAS, no fp32 weight copy)."""
    if _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).reshape(*x.shape[:-1], -1)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    return F.linear(x.float(), weight.float())


@dataclass
class Kernels:
    deterministic: bool = False

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.deterministic:
            return invariant.linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def linear_fp32(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T with float32 products, sums and output: the same maths as upcasting both first,
        without materialising a float32 copy of the weight (600 MB for a 151936 x 1024 LM head)."""
        if self.deterministic:
            return invariant.linear_fp32(x, weight)
        if use_triton(x, weight) and x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16):
            return _mm_fp32_out(x, weight)
        return self.linear(x.float(), weight.float())

    def rms_norm(self, x, weight, eps, residual=None):
        if self.deterministic:
            return invariant.rms_norm(x, weight, eps, residual)
        if use_triton(x, weight, residual):
            return triton_norm.rms_norm(x, weight, eps, residual)
        return reference.rms_norm(x, weight, eps, residual)

    def apply_rotary(self, q, k, cos, sin):
        if self.deterministic:
            return invariant.apply_rotary(q, k, cos, sin)
        if use_triton(q, k):
            return triton_elementwise.apply_rotary(q, k, cos, sin)
        return reference.apply_rotary(q, k, cos, sin)

    def silu_and_mul(self, x):
        if self.deterministic:
            return invariant.silu_and_mul(x)
        if use_triton(x):
            return triton_elementwise.silu_and_mul(x)
        return reference.silu_and_mul(x)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Write k/v into the cache (if any), then attend. Without a cache: causal within each sequence."""
        if self.deterministic:
            return invariant.attention(q, k, v, kv_cache, meta, scale)
        impl = triton_attention if use_triton(q, k, v) else reference
        if kv_cache is None:
            return impl.varlen_attention(q, k, v, meta, scale)
        k_cache, v_cache = kv_cache
        impl.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        return impl.paged_attention(q, k_cache, v_cache, meta, scale)

    def log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        """log-softmax over the vocabulary of float32 logits [N, V] (the sampler's and the trainer's)."""
        if self.deterministic:
            return invariant.log_softmax(logits)
        return torch.log_softmax(logits, dim=-1)
