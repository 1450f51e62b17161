"""Plain-torch definitions of every kernel. CPU code paths run these; Triton kernels are tested
against them. Cast orders follow HF transformers' Llama/Qwen implementations so that a float32
forward matches HF to rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parity.kernels.metadata import AttentionMetadata


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual`, first adds it and also returns the sum.

    Variance in float32, normalised value cast back to the input dtype, then times the weight
    (HF's LlamaRMSNorm order).
    """
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding. q: [T, H, D], k: [T, KV, D], cos/sin: [T, D] in q's dtype."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding gate then up projections -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def store_kvcache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write token t's K/V into flat slot `slot_mapping[t]` of the paged cache; -1 means skip."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[keep].to(v_cache.dtype)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [Q, H, D] are the last Q of the L positions in k/v: [L, KV, D]. Float32 softmax."""
    num_q, num_heads, _ = q.shape
    num_k, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(num_k - num_q, num_k, device=q.device)
    k_pos = torch.arange(num_k, device=q.device)
    scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of the ragged batch q: [T, H, D] over the paged cache [blocks, block_size, KV, D]."""
    out = torch.zeros_like(q)
    block_size = k_cache.shape[1]
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        q_i = q[starts[i] : starts[i + 1]]
        if q_i.shape[0] == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :num_blocks].long()
        k = k_cache.index_select(0, blocks).flatten(0, 1)[:seq_len]
        v = v_cache.index_select(0, blocks).flatten(0, 1)[:seq_len]
        out[starts[i] : starts[i + 1]] = _causal_attention(q_i, k, v, scale)
    return out


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Causal attention within each packed sequence, with no cache (trainer-side forward)."""
    out = torch.zeros_like(q)
    starts = meta.query_start_loc_cpu
    for i in range(meta.num_seqs):
        s, e = starts[i], starts[i + 1]
        out[s:e] = _causal_attention(q[s:e], k[s:e], v[s:e], scale)
    return out
