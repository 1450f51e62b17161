"""Backend dispatch: each op picks its implementation from the tensor's device.

GPU kernels register themselves here (see `use_triton`); until then, and on CPU, every op is
the reference in `parity.kernels.reference`.
"""

from __future__ import annotations

import torch

from parity.kernels import reference
from parity.kernels.metadata import AttentionMetadata


def rms_norm(x, weight, eps, residual=None):
    return reference.rms_norm(x, weight, eps, residual)


def apply_rotary(q, k, cos, sin):
    return reference.apply_rotary(q, k, cos, sin)


def silu_and_mul(x):
    return reference.silu_and_mul(x)


def attention(
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
