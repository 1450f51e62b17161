"""Triton rotary embedding (alone, or fused with Qwen3's per-head q/k RMSNorm and the KV-cache write) and
SiLU-and-mul. Same signatures as `reference.py`, and the same rounding: each intermediate that torch would
materialise in the compute dtype is rounded to it here too, so on the GPU these agree with the reference up
to the last bit of a transcendental (or of a float32 sum's order)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parity.kernels import reference
from parity.kernels.triton.attention import store_kvcache
from parity.kernels.triton.norm import rms_norm
from parity.kernels.triton.pdl import LAUNCH, wait_for_previous
from parity.kernels.triton.rotary import cos_sin_halves, norm_rotate, store_rotated_kv


@triton.jit
def _rope_and_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_out_ptr, k_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    eps, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr, CACHE: tl.constexpr,
):
    wait_for_previous()
    t = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    jm = j < HALF
    c1, c2, s1, s2 = cos_sin_halves(cos_ptr, sin_ptr, t, stride_ct, stride_st, HALF, BLOCK_HALF)
    dt = q_out_ptr.dtype.element_ty
    hq = tl.arange(0, BLOCK_H)[:, None]
    q1, q2 = norm_rotate(q_ptr, qw_ptr, t, stride_qt, stride_qh, c1, c2, s1, s2, eps, dt,
                          NUM_HEADS, HALF, BLOCK_H, BLOCK_HALF, NORM)
    q_dst = q_out_ptr + t * NUM_HEADS * 2 * HALF + hq * 2 * HALF + j
    tl.store(q_dst, q1, mask=(hq < NUM_HEADS) & jm)
    tl.store(q_dst + HALF, q2, mask=(hq < NUM_HEADS) & jm)
    hk = tl.arange(0, BLOCK_KV)[:, None]
    kv_mask = (hk < NUM_KV_HEADS) & jm
    k1, k2 = norm_rotate(k_ptr, kw_ptr, t, stride_kt, stride_kh, c1, c2, s1, s2, eps, dt,
                          NUM_KV_HEADS, HALF, BLOCK_KV, BLOCK_HALF, NORM)
    k_dst = k_out_ptr + t * NUM_KV_HEADS * 2 * HALF + hk * 2 * HALF + j
    tl.store(k_dst, k1, mask=kv_mask)
    tl.store(k_dst + HALF, k2, mask=kv_mask)
    if CACHE:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:  # -1: a padding token, nothing to write
            store_rotated_kv(k_cache_ptr, v_cache_ptr, slot * stride_cs + hk * stride_ch + j, k1, k2,
                             v_ptr + t * stride_vt + hk * stride_vh + j, kv_mask, HALF)


def _launch(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping, q_out, k_out) -> None:
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    num_kv_heads = k.shape[1]
    q, k, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, cos, sin))
    norm = q_weight is not None
    k_cache, v_cache = kv_cache if kv_cache is not None else (k_out, k_out)
    if kv_cache is not None:
        assert k_cache.is_contiguous() and v_cache.is_contiguous() and v.stride(-1) == 1
    half = head_dim // 2
    _rope_and_cache_kernel[(num_tokens,)](
        q, k, k if v is None else v, cos, sin, q_weight if norm else q, k_weight if norm else k, q_out, k_out,
        k_cache, v_cache, slot_mapping if kv_cache is not None else q_out, float(eps) if norm else 0.0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), *(k if v is None else v).stride()[:2],
        cos.stride(0), sin.stride(0), num_kv_heads * head_dim, head_dim,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_KV=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=triton.next_power_of_2(half), NORM=norm,
        CACHE=kv_cache is not None, **LAUNCH,
    )


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding. q: [T, H, D], k: [T, KV, D], cos/sin: [T, D]; one launch for both."""
    q_out = torch.empty(q.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
    k_out = torch.empty(k.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
    _launch(q, k, None, cos, sin, None, None, None, None, None, q_out, k_out)
    return q_out, k_out


def fuses(q, k, v, cos, q_weight, k_weight) -> bool:
    """Whether `rope_and_cache` runs its one kernel: every operand in one dtype (mixed ones promote, as the
    separate kernels do)."""
    dtypes = {q.dtype, k.dtype, v.dtype, cos.dtype} | ({q_weight.dtype, k_weight.dtype} if q_weight is not None else set())
    return len(dtypes) == 1


def rope_and_cache(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping):
    """`reference.rope_and_cache` in one launch: per-head RMSNorm of q and k (when the weights are given),
    RoPE, and k (rotated) / v written into the paged cache (when given) at `slot_mapping`. One program per token,
    whatever the batch: batch-invariant, so deterministic mode runs it too."""
    if not fuses(q, k, v, cos, q_weight, k_weight):
        return reference.rope_and_cache_from(rms_norm, apply_rotary, store_kvcache)(
            q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, slot_mapping, q_out, k_out)
    return q_out, k_out


@triton.jit
def silu_mul(gate, up, dt: tl.constexpr):
    """silu(gate) * up as the reference rounds it: silu to `dt`, then the product. gate and up in float32, already
    rounded to `dt` (also the epilogue of `gemv.gemv_silu_and_mul`)."""
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    return (silu * up).to(dt)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, I, BLOCK: tl.constexpr):  # noqa: E741
    wait_for_previous()
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + I + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * I + cols, silu_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] holding gate then up projections -> silu(gate) * up."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, x2.stride(0), inter, BLOCK=block, **LAUNCH)
    return out.reshape(*x.shape[:-1], inter)
