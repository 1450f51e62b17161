"""Batch-invariant kernels for deterministic mode on CPU: a token's result depends on that token alone.

Why ordinary kernels are not invariant: a matmul library picks its blocking (on GPUs also split-K)
from the number of rows; CPU elementwise kernels switch between a vectorised body and a scalar tail
at offsets that depend on the tensor's size; attention backends use different kernels (and split-KV)
for prefill and decode. Each choice changes the order of floating-point operations, so the same
token gets different low bits depending on what else is in the batch (Thinking Machines,
"Defeating Nondeterminism in LLM Inference", 2025). The engine's batch changes every step, the
trainer's packed batch is different again, so the rollout and the trainer disagree.

The fix: every reduction runs in an order fixed by the token's own shapes.
- CPU (this file, plain torch): each op that reduces, or evaluates a transcendental, runs row by row
  on a fresh contiguous copy of the row, so a row always meets the same kernel with the same shape.
  Attention runs per query row over exactly the keys at positions <= its own, gathered into a fresh
  tensor whether they come from the paged KV cache (engine, any chunking) or from the packed batch
  (trainer). Slow (a Python loop per row): the CPU reference. Under autograd the trainer runs these
  forwards with analytic backwards (`invariant_autograd.py`); autograd through the loops would cost
  rows x parameters.
- CUDA: Triton kernels (`triton/invariant.py`): matmul with no split-K (a row is one chain of MMA steps
  over K, so its tiles may follow the batch size), one-pass RMSNorm per row, attention with one fixed key order
  for prefill, decode and the trainer path, and a fixed-chunk log-softmax; under autograd with the same
  analytic backwards (`triton/invariant_autograd.py`). Cost vs fast mode: benchmarks/RESULTS.md.
Ops that are exact elementwise IEEE arithmetic (RoPE's multiply-adds, the residual add) are
invariant already and keep their normal kernels on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from parity.kernels import reference
from parity.kernels.metadata import AttentionMetadata


def _fresh(row: torch.Tensor) -> torch.Tensor:
    """`row` in freshly allocated contiguous memory (same alignment for every row)."""
    return row.clone(memory_format=torch.contiguous_format)


def _row(x: torch.Tensor, i: int) -> torch.Tensor:
    """Row i as [1, ...], fresh (`_fresh`)."""
    return _fresh(x[i : i + 1])


def _per_row(fn: Callable, *tensors: torch.Tensor):
    """fn applied to each row (dim 0) of `tensors` separately; outputs concatenated back. Rows come from one
    `split` per tensor: its backward is one concatenation, where a slice per row gave every row a zero-filled
    gradient of the whole input (quadratic in the rows: the CPU trainer's backward took 2x longer)."""
    num_rows = tensors[0].shape[0]
    if num_rows == 0:
        return fn(*tensors)
    rows = [t.split(1) for t in tensors]
    outs = [fn(*(_fresh(r[i]) for r in rows)) for i in range(num_rows)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b), each row computed alone."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.dtype != torch.float32:
        # fp16/bf16: products are exact in float32, so upcasting keeps the maths of a half-precision GEMM
        # (float32 accumulation, one rounding at the end); torch's CPU half GEMM opens a thread pool per call.
        wf, bf = weight.float(), None if bias is None else bias.float()
        y = _per_row(lambda r: F.linear(r.float(), wf, bf).to(x.dtype), x2)
    else:
        y = _per_row(lambda r: F.linear(r, weight, bias), x2)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T with float32 products, sums and output (the LM head under logits_fp32)."""
    return linear(x.float(), weight.float())


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`reference.rms_norm` (HF's cast order), one row at a time."""
    if residual is None:
        return _per_row(lambda r: reference.rms_norm(r, weight, eps), x)
    return _per_row(lambda r, res: reference.rms_norm(r, weight, eps, res), x, residual)


# RoPE's multiply-adds are exactly rounded, so invariant with any kernel; the sampler's Gumbel-max is
# integer hashing and float64 maths per row.
apply_rotary = reference.apply_rotary
gumbel_argmax = reference.gumbel_argmax


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU uses exp, whose CPU vector body and scalar tail can differ in the last bit: per row."""
    return _per_row(reference.silu_and_mul, x)


# torch's CPU (log-)softmax always opens an OpenMP region (grain size 0), which costs milliseconds per
# call on a busy machine; these spell it out with ops that stay single-threaded on one row.
def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)


def _log_softmax_row(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.amax(dim=-1, keepdim=True)
    return shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the last dim of [N, V], each row alone."""
    return _per_row(_log_softmax_row, logits)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row q [H, D] over its keys k, v [L, KV, D] (positions 0..L-1, all visible).

    Float32 scores and softmax like `reference._causal_attention`; fresh copies make the kernels see
    the same shapes, strides and alignment whatever tensor the keys were gathered from.
    """
    num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qf = q.to(torch.float32, copy=True).view(num_kv_heads, num_heads // num_kv_heads, 1, head_dim)
    kf = k.to(torch.float32, copy=True).transpose(0, 1).unsqueeze(1)  # [KV, 1, L, D]
    vf = v.to(torch.float32, copy=True).transpose(0, 1).unsqueeze(1)  # [KV, 1, L, D]
    # Products and sums instead of bmm: CPU bmm opens a thread pool per call (slow on a busy machine).
    probs = _softmax((qf * kf).sum(dim=-1) * scale)  # [KV, group, L]
    return (probs.unsqueeze(-1) * vf).sum(dim=-2).reshape(num_heads, head_dim).to(q.dtype)


def _attend_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """q [Q, H, D] are the last Q of the L positions in k/v [L, KV, D]; row j sees keys 0..L-Q+j."""
    first = k.shape[0] - q.shape[0]
    return [_attend_one(q[j], k[: first + j + 1], v[: first + j + 1], scale) for j in range(q.shape[0])]


def attention(q, k, v, kv_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attend over the paged cache (holding this step's k/v already) or within the packed sequences, with the
    same per-query key order for the paged cache (prefill chunks, decode) and the packed trainer batch."""
    starts = meta.query_start_loc_cpu
    rows: list[torch.Tensor] = []
    if kv_cache is None:
        for i in range(meta.num_seqs):
            s, e = starts[i], starts[i + 1]
            rows += _attend_sequence(q[s:e], k[s:e], v[s:e], scale)
    else:
        k_cache, v_cache = kv_cache
        for i in range(meta.num_seqs):
            if starts[i + 1] == starts[i]:
                continue
            k_seq, v_seq = reference.gather_kv(k_cache, v_cache, meta, i)
            rows += _attend_sequence(q[starts[i] : starts[i + 1]], k_seq, v_seq, scale)
    out = torch.stack(rows) if rows else torch.zeros_like(q)
    if out.shape[0] != q.shape[0]:  # rows past the last sequence (padding) attend to nothing
        out = torch.cat([out, torch.zeros_like(q[out.shape[0] :])])
    return out


rope_and_cache = reference.rope_and_cache_from(rms_norm, apply_rotary, reference.store_kvcache)


# ------------------------------------------------------------------------------ mixture of experts
def moe_route(router_logits, top_k: int, renormalize: bool, chosen=None):
    """`reference.moe_route`, one token at a time (the softmax and top-k see one row's shape only)."""
    if chosen is None:
        return _per_row(lambda r: reference.moe_route(r, top_k, renormalize), router_logits)
    return _per_row(lambda r, c: reference.moe_route(r, top_k, renormalize, c), router_logits, chosen)


def _expert_row(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One token [1, H] through one expert, with `linear`'s per-row arithmetic."""
    return linear(silu_and_mul(linear(x, gate_up)), down)


def fused_moe(x, gate_up, down, topk_weights, topk_ids):
    """Each token alone: its experts in ascending id order (the order HF's loop adds them), each a row GEMM,
    weighted and summed from zero. No pair's numbers depend on any other token."""
    rows = []
    for t in range(x.shape[0]):
        xt = _row(x, t)
        ids, slots = torch.sort(topk_ids[t], stable=True)
        acc = xt.new_zeros(xt.shape)
        for e, j in zip(ids.tolist(), slots.tolist()):
            acc = acc + _expert_row(xt, gate_up[e], down[e]) * topk_weights[t, j]
        rows.append(acc)
    return torch.cat(rows) if rows else x.new_zeros(x.shape)
