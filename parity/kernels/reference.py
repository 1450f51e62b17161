"""Plain-torch definitions of every kernel: fast mode on CPU and under autograd runs these, and every
other implementation is tested against them. Cast orders follow HF transformers' Llama/Qwen
implementations so that a float32 forward matches HF to rounding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from parity.kernels.metadata import AttentionMetadata


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with float32 products, sums and output (the LM head under logits_fp32)."""
    return F.linear(x.float(), weight.float())


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary of float32 logits [N, V] (the sampler's and the trainer's)."""
    return torch.log_softmax(logits, dim=-1)


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
    """Write token t's K/V into flat slot `slot_mapping[t]` of the paged cache; -1 means skip.

    index_copy_ rather than advanced indexing: CPU advanced indexing opens a thread pool per call."""
    keep = (slot_mapping >= 0).nonzero().squeeze(1)
    slots = slot_mapping.index_select(0, keep)
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.index_select(0, keep).to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.index_select(0, keep).to(v_cache.dtype))


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, seq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `seq_lens[seq]` K/V rows [L, KV, D] of sequence `seq`, gathered from its cache blocks."""
    seq_len = meta.seq_lens_cpu[seq]
    blocks = meta.block_tables[seq, : -(-seq_len // k_cache.shape[1])].long()
    return (k_cache.index_select(0, blocks).flatten(0, 1)[:seq_len],
            v_cache.index_select(0, blocks).flatten(0, 1)[:seq_len])


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
    starts = meta.query_start_loc_cpu
    for i in range(meta.num_seqs):
        if starts[i + 1] == starts[i]:
            continue
        k, v = gather_kv(k_cache, v_cache, meta, i)
        out[starts[i] : starts[i + 1]] = _causal_attention(q[starts[i] : starts[i + 1]], k, v, scale)
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


def attention_from(paged_attention, varlen_attention):
    """An implementation's `attention` from its paged attention and its packed attention."""

    def attention(q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attend over the paged cache, which already holds this step's k/v (`rope_and_cache` wrote them);
        without a cache, causally within each packed sequence of k/v."""
        if kv_cache is None:
            return varlen_attention(q, k, v, meta, scale)
        return paged_attention(q, *kv_cache, meta, scale)

    return attention


def rope_and_cache_from(rms_norm, apply_rotary, store_kvcache):
    """An implementation's `rope_and_cache` from its RMSNorm, RoPE and cache write."""

    def rope_and_cache(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping):
        """Per-head RMSNorm of q and k (Qwen3; skipped when the weights are None), RoPE, then k/v written into
        the paged cache (if any) at `slot_mapping` (-1: skip). Returns the rotated (q, k)."""
        if q_weight is not None:
            q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
        q, k = apply_rotary(q, k, cos, sin)
        if kv_cache is not None:
            store_kvcache(k, v, *kv_cache, slot_mapping)
        return q, k

    return rope_and_cache


attention = attention_from(paged_attention, varlen_attention)
rope_and_cache = rope_and_cache_from(rms_norm, apply_rotary, store_kvcache)


# ------------------------------------------------------------------------------ Gumbel-max sampling
# Counter-based noise: the draw for (seed, output position, vocab id) is a fixed hash, so a sample
# depends only on its own seed and history, never on the batch it ran in, the device, or preemption.
_MASK62 = (1 << 62) - 1


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser; int64 multiplication wraps like uint64."""
    x = x ^ _shift_right(x, 30)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9
    x = x ^ _shift_right(x, 27)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ _shift_right(x, 31)


def noise_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The per-row hash key of (seed, step) that `uniform_noise` mixes with each vocab id. [B] int64."""
    return _mix64((seeds & _MASK62) * 0x9E3779B9 + steps)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u in (0, 1), float64 [B, V], a pure function of (seed, step, vocab id)."""
    key = noise_keys(seeds, steps)  # [B]
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix64(key[:, None] ^ (vocab[None, :] * -7046029254386353131))  # 0x9e3779b97f4a7c15
    return (_shift_right(bits, 11).double() + 0.5) / float(1 << 53)


def gumbel_argmax(logprobs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """argmax(logprobs + g) per row, g = -log(-log u) with the counter-based u; int64 [B]."""
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, logprobs.shape[-1])))
    return (logprobs.double() + gumbel).argmax(dim=-1)


# ------------------------------------------------------------------------------ mixture of experts
# Shapes: x [T, H]; router logits [T, E]; the fused expert weights gate_up [E, 2I, H] (gate rows then up rows,
# HF's Qwen3MoeExperts layout) and down [E, H, I]; a token's k choices as ids/weights [T, k]. The (token, slot)
# pairs are worked on in `order`, the flat pair indices p = t * k + j sorted by expert; `offsets` [E + 1] bound
# each expert's run in it.
def moe_route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, chosen: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the logits' dtype, expert ids [T, k] int64) as HF's Qwen3MoeTopKRouter computes them:
    float32 softmax over all experts, top-k, renormalised to sum 1 when `renormalize`. `chosen` (routing replay)
    replaces the top-k with the given experts; their weights still come from this softmax."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    if chosen is None:
        top, ids = torch.topk(probs, top_k, dim=-1)
    else:
        ids = chosen.to(device=probs.device, dtype=torch.int64)
        top = probs.gather(-1, ids)
    if renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(router_logits.dtype), ids


def moe_sort(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [T * k] int64, offsets [E + 1] int64): the (token, slot) pairs grouped by expert, in pair order
    within an expert (a stable sort)."""
    flat = topk_ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def moe_gate_up(
    x: torch.Tensor, gate_up: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, top_k: int
) -> torch.Tensor:
    """silu(gate) * up of every pair, [T * k, I] in `order`: one GEMM per expert over its tokens."""
    bounds = offsets.tolist()
    tokens = order // top_k
    parts = [silu_and_mul(F.linear(x.index_select(0, tokens[a:b]), gate_up[e]))
             for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
    return torch.cat(parts) if parts else x.new_zeros(0, gate_up.shape[1] // 2)


def moe_down(h: torch.Tensor, down: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """h [T * k, I] (in `order`) through each pair's expert down projection -> [T * k, H]."""
    bounds = offsets.tolist()
    parts = [F.linear(h[a:b], down[e]) for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
    return torch.cat(parts) if parts else h.new_zeros(0, down.shape[1])


def moe_combine(y: torch.Tensor, topk_weights: torch.Tensor, order: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out[t] = sum over t's pairs of weight * y, added in `order` (ascending expert id, as HF's loop adds)."""
    top_k = topk_weights.shape[-1]
    weighted = y * topk_weights.reshape(-1).index_select(0, order)[:, None]
    return y.new_zeros(num_tokens, y.shape[-1]).index_add(0, order // top_k, weighted)


def fused_moe(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The experts' weighted sum for each token [T, H]: sort pairs by expert, gate/up GEMM with SiLU, down GEMM,
    combine."""
    order, offsets = moe_sort(topk_ids, gate_up.shape[0])
    h = moe_gate_up(x, gate_up, order, offsets, topk_ids.shape[-1])
    return moe_combine(moe_down(h, down, offsets), topk_weights, order, x.shape[0])
