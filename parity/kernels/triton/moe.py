"""Mixture-of-experts kernels on CUDA (signatures as `reference.moe_route` / `reference.fused_moe`).

- `moe_route`: one program per token: float32 softmax over the E router logits, top-k by k passes of argmax
  (the lowest id wins a tie), renormalised when asked, as HF's Qwen3MoeTopKRouter computes it.
- `moe_align`: the (token, slot) pairs sorted by expert and padded per expert to whole BLOCK_M tiles (vLLM's
  moe_align_block_size idea), all on the device with no host sync, so a decode step stays capturable in a CUDA
  graph: the grid is the static upper bound ceil(T*k / BLOCK_M) + E tiles; tiles past the end exit at once.
- `_gate_up_kernel`: a grouped GEMM, one expert per tile: x rows gathered through the sorted pair list times the
  expert's gate and up rows, float32 accumulation, silu(gate) * up written once in the input dtype.
- `_down_kernel`: the down projection of each tile, written back in pair order.
- `_combine_kernel`: one program per token sums its k weighted pair outputs in slot order, in float32.
Tile sizes come from the weight shapes only (never from the number of tokens) and a row's dot products run
over K in the same BLOCK_K steps whichever tile it lands in, so a token's output does not depend on the batch.
The GEMMs do not specialise on `num_pairs` (T*k, which changes every step and only feeds masks), so a step
never stops to compile a variant for a count that happens to be divisible by 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.kernels import reference
from parity.kernels.triton.mma import dot  # fp32: full-precision products; the interpreter: fp32
from parity.kernels.triton.pdl import LAUNCH, wait_for_previous

BLOCK_M = 16  # pair rows per tile; small because a decode batch gives each expert only a few tokens


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


# ------------------------------------------------------------------------------------------ routing
@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_l, K: tl.constexpr, RENORM: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    wait_for_previous()
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    x = tl.load(logits_ptr + t * stride_l + offs, mask=mask, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    p = e / tl.sum(e, axis=0)
    work = tl.where(mask, p, -1.0)
    total = 0.0
    for j in tl.static_range(K):
        best = tl.max(work, axis=0)
        idx = tl.min(tl.where(work == best, offs, BLOCK_E), axis=0)  # lowest id among equals
        tl.store(ids_ptr + t * K + j, idx.to(tl.int64))
        tl.store(weights_ptr + t * K + j, best)
        total += best
        work = tl.where(offs == idx, -2.0, work)
    if RENORM:
        for j in tl.static_range(K):
            w = tl.load(weights_ptr + t * K + j)
            tl.store(weights_ptr + t * K + j, w / total)


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool, chosen: torch.Tensor | None = None):
    """(weights [T, k] in the logits' dtype, ids [T, k] int64); `chosen` (routing replay) takes the torch path."""
    if chosen is not None:
        return reference.moe_route(router_logits, top_k, renormalize, chosen)
    logits = router_logits.contiguous()
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens:
        _route_kernel[(num_tokens,)](logits, weights, ids, num_experts, logits.stride(0), K=top_k,
                                     RENORM=renormalize, BLOCK_E=triton.next_power_of_2(num_experts), **LAUNCH)
    return weights.to(router_logits.dtype), ids


# ------------------------------------------------------------------------------ sorting by expert
def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """(sorted_pairs [P] int64, padded with T*k; tile_expert [P / block_m] int64, E past the last tile) where
    P = (ceil(T*k / block_m) + E) * block_m, the static bound. Pairs of one expert keep their order."""
    flat = topk_ids.reshape(-1)
    num_pairs, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    order = torch.sort(flat, stable=True).indices
    expert_of = flat.index_select(0, order)
    dest = (padded_ends - padded).index_select(0, expert_of) + torch.arange(num_pairs, device=dev) \
        - starts.index_select(0, expert_of)
    num_tiles = -(-num_pairs // block_m) + num_experts
    sorted_pairs = torch.full((num_tiles * block_m,), num_pairs, dtype=torch.int64, device=dev)
    sorted_pairs.scatter_(0, dest, order)
    tile_start = torch.arange(num_tiles, device=dev) * block_m
    tile_expert = torch.searchsorted(padded_ends, tile_start, right=True)  # == E past the last expert's tiles
    return sorted_pairs, tile_expert


# ----------------------------------------------------------------------------------- grouped GEMMs
@triton.jit
def _tile(pairs_ptr, tile_expert_ptr, w_ptr, num_pairs, N, stride_we, stride_wn,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's tile: its expert (E past the last tile), its rows (slots in the sorted pair list), the
    pair each holds (padding: `valid` false), its output columns and the expert's weight rows for them."""
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(pairs_ptr + rows)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
    return expert, rows, pairs, pairs < num_pairs, offs_n, offs_n < N, w_cols


@triton.jit
def _k_tiles(a_rows, valid, w_cols, n_mask, k0, Kdim, BLOCK_K: tl.constexpr):
    """One K step: the activation tile [BLOCK_M, BLOCK_K] (padding rows read 0) from the row pointers
    `a_rows`, and the pointers and mask of the weight tile [BLOCK_K, BLOCK_N]."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < Kdim
    a = tl.load(a_rows + offs_k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
    return a, w_cols + offs_k[:, None], n_mask[None, :] & k_mask[:, None]


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, pairs_ptr, tile_expert_ptr, num_pairs, E, N, Kdim,
                    stride_x, stride_we, stride_wn, stride_h,
                    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    wait_for_previous()
    expert, rows, pairs, valid, offs_n, n_mask, w_cols = _tile(
        pairs_ptr, tile_expert_ptr, w_ptr, num_pairs, N, stride_we, stride_wn, BLOCK_M, BLOCK_N)
    if expert >= E:
        return
    x_rows = x_ptr + tl.where(valid, pairs // TOP_K, 0)[:, None] * stride_x  # each pair's token
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, Kdim, BLOCK_K):
        xs, w_ptrs, w_mask = _k_tiles(x_rows, valid, w_cols, n_mask, k0, Kdim, BLOCK_K)
        acc_g += dot(xs, tl.load(w_ptrs, mask=w_mask, other=0.0))
        acc_u += dot(xs, tl.load(w_ptrs + N * stride_wn, mask=w_mask, other=0.0))  # the up rows follow gate's
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + rows[:, None] * stride_h + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(h_ptr, w_ptr, y_ptr, pairs_ptr, tile_expert_ptr, num_pairs, E, N, Kdim,
                 stride_h, stride_we, stride_wn, stride_y,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    wait_for_previous()
    expert, rows, pairs, valid, offs_n, n_mask, w_cols = _tile(
        pairs_ptr, tile_expert_ptr, w_ptr, num_pairs, N, stride_we, stride_wn, BLOCK_M, BLOCK_N)
    if expert >= E:
        return
    h_rows = h_ptr + rows[:, None] * stride_h
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, Kdim, BLOCK_K):
        hs, w_ptrs, w_mask = _k_tiles(h_rows, valid, w_cols, n_mask, k0, Kdim, BLOCK_K)
        acc += dot(hs, tl.load(w_ptrs, mask=w_mask, other=0.0))
    safe_pairs = tl.where(valid, pairs, 0)
    tl.store(y_ptr + safe_pairs[:, None] * stride_y + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _combine_kernel(y_ptr, w_ptr, out_ptr, H, stride_y, stride_out, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    wait_for_previous()
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(TOP_K):
        w = tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        acc += w * tl.load(y_ptr + (t * TOP_K + j) * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Each token's experts' SwiGLU MLPs, weighted and summed [T, H]: align, gate/up+SiLU, down, combine."""
    x = x.contiguous()
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = gate_up.shape
    inter, top_k = two_inter // 2, topk_ids.shape[-1]
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    gate_up, down = gate_up.contiguous(), down.contiguous()
    pairs, tile_expert = moe_align(topk_ids, num_experts)
    num_pairs, num_tiles = num_tokens * top_k, tile_expert.numel()
    h = torch.empty(pairs.numel(), inter, dtype=x.dtype, device=x.device)
    bn, bk = _block(inter, 64), _block(hidden, 64)
    _gate_up_kernel[(num_tiles, triton.cdiv(inter, bn))](
        x, gate_up, h, pairs, tile_expert, num_pairs, num_experts, inter, hidden,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0),
        TOP_K=top_k, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk, **LAUNCH)
    y = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    bn, bk = _block(hidden, 64), _block(inter, 64)
    _down_kernel[(num_tiles, triton.cdiv(hidden, bn))](
        h, down, y, pairs, tile_expert, num_pairs, num_experts, hidden, inter,
        h.stride(0), down.stride(0), down.stride(1), y.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk, **LAUNCH)
    bh = _block(hidden, 1024)
    _combine_kernel[(num_tokens, triton.cdiv(hidden, bh))](
        y, topk_weights.contiguous(), out, hidden, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_H=bh, **LAUNCH)
    return out


class _FusedMoE(torch.autograd.Function):
    """The Triton forward's values, with gradients from autograd through `reference.fused_moe` (recomputed in
    backward): the trainer's deterministic forward equals the engine's bit for bit."""

    @staticmethod
    def forward(ctx, x, gate_up, down, topk_weights, topk_ids):
        ctx.save_for_backward(x, gate_up, down, topk_weights, topk_ids)
        return fused_moe(x, gate_up, down, topk_weights, topk_ids)

    @staticmethod
    def backward(ctx, grad):
        x, gate_up, down, weights, ids = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) for t, need in zip((x, gate_up, down, weights),
                                                                      ctx.needs_input_grad[:4])]
        with torch.enable_grad():
            out = reference.fused_moe(*inputs, ids)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad.to(out.dtype)))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None)


def fused_moe_autograd(x, gate_up, down, topk_weights, topk_ids):
    return _FusedMoE.apply(x, gate_up, down, topk_weights, topk_ids)
