"""Fused Gumbel-max sampling: argmax(logprobs + g) with the sampler's counter-based noise computed in
registers, so the [B, V] float64 noise never touches device memory. Bit-identical to the torch
definition `reference.gumbel_argmax` (same integer hash, same float64 maths, first index on ties)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.kernels.reference import noise_keys
from parity.kernels.triton.pdl import LAUNCH, wait_for_previous


@triton.jit
def _mix64(x):
    """SplitMix64's finaliser on uint64 (`reference._mix64`)."""
    x = x ^ (x >> 30)
    x = x * 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27)
    x = x * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _gumbel_argmax_kernel(logprobs_ptr, keys_ptr, best_val_ptr, best_idx_ptr, vocab_size, stride_row, num_chunks,
                          BLOCK: tl.constexpr):
    wait_for_previous()
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab_size
    key = tl.load(keys_ptr + row).to(tl.uint64)
    bits = _mix64(key ^ (offs.to(tl.uint64) * 0x9E3779B97F4A7C15))
    u = ((bits >> 11).to(tl.float64) + 0.5) / 9007199254740992.0  # 2**53
    gumbel = -tl.log(-tl.log(u))
    lp = tl.load(logprobs_ptr + row.to(tl.int64) * stride_row + offs, mask=mask, other=0.0).to(tl.float64)
    val = tl.where(mask, lp + gumbel, float("-inf"))
    best = tl.max(val, 0)
    idx = tl.min(tl.where(val == best, offs, vocab_size), 0)  # first index of the maximum
    tl.store(best_val_ptr + row * num_chunks + chunk, best)
    tl.store(best_idx_ptr + row * num_chunks + chunk, idx)


def gumbel_argmax(logprobs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """argmax over the vocab of logprobs[b].double() + gumbel(seeds[b], steps[b], vocab id); int64 [B]."""
    keys = noise_keys(seeds, steps)
    batch, vocab = logprobs.shape
    block = 4096
    num_chunks = triton.cdiv(vocab, block)
    best_val = torch.empty(batch, num_chunks, dtype=torch.float64, device=logprobs.device)
    best_idx = torch.empty(batch, num_chunks, dtype=torch.int32, device=logprobs.device)
    if logprobs.stride(-1) != 1:
        logprobs = logprobs.contiguous()
    _gumbel_argmax_kernel[(batch, num_chunks)](
        logprobs, keys, best_val, best_idx, vocab, logprobs.stride(0), num_chunks, BLOCK=block, num_warps=8, **LAUNCH
    )
    chunk = best_val.argmax(dim=1, keepdim=True)  # first chunk holding the maximum
    return best_idx.gather(1, chunk).squeeze(1).long()
