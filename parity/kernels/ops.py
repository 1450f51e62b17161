"""The kernel set a model calls, dispatched per call.

`Kernels` picks each op's implementation from the tensor's device (Triton on CUDA, the plain-torch
reference in `reference.py` elsewhere) and from `deterministic` (batch-invariant implementations,
whose results for a token do not depend on what else is in the batch). Every module of a model
holds the same `Kernels` instance, so flipping the mode on the model flips it everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parity.kernels import reference
from parity.kernels.metadata import AttentionMetadata


@dataclass
class Kernels:
    deterministic: bool = False

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def rms_norm(self, x, weight, eps, residual=None):
        return reference.rms_norm(x, weight, eps, residual)

    def apply_rotary(self, q, k, cos, sin):
        return reference.apply_rotary(q, k, cos, sin)

    def silu_and_mul(self, x):
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
        if kv_cache is None:
            return reference.varlen_attention(q, k, v, meta, scale)
        k_cache, v_cache = kv_cache
        reference.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        return reference.paged_attention(q, k_cache, v_cache, meta, scale)
