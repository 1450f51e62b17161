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
from parity.kernels.triton.norm import rms_norm, scale_normalised
from parity.kernels.triton.pdl import LAUNCH, wait_for_previous


@triton.jit
def _norm_rotate(x_ptr, w_ptr, t, stride_t, stride_h, c1, c2, s1, s2, eps, dt: tl.constexpr,
                 NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 NORM: tl.constexpr):
    """Heads [BLOCK_H, 2 x BLOCK_HALF] of token t, RMS-normalised (NORM) as `reference.rms_norm` casts, then
    rotated as torch computes x * cos + rotate_half(x) * sin: each product and the sum rounded to `dt`.
    Returns both halves in `dt`."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < NUM_HEADS) & (j < HALF)
    src = x_ptr + t * stride_t + h * stride_h + j
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        w1 = tl.load(w_ptr + j, mask=j < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + j, mask=j < HALF, other=0.0).to(tl.float32)
        x1 = scale_normalised(x1, inv, w1, dt).to(dt).to(tl.float32)
        x2 = scale_normalised(x2, inv, w2, dt).to(dt).to(tl.float32)
    o1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    return o1, o2


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
    c1 = tl.load(cos_ptr + t * stride_ct + j, mask=jm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + j, mask=jm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + j, mask=jm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + j, mask=jm, other=0.0).to(tl.float32)
    dt = q_out_ptr.dtype.element_ty
    hq = tl.arange(0, BLOCK_H)[:, None]
    q1, q2 = _norm_rotate(q_ptr, qw_ptr, t, stride_qt, stride_qh, c1, c2, s1, s2, eps, dt,
                          NUM_HEADS, HALF, BLOCK_H, BLOCK_HALF, NORM)
    q_dst = q_out_ptr + t * NUM_HEADS * 2 * HALF + hq * 2 * HALF + j
    tl.store(q_dst, q1, mask=(hq < NUM_HEADS) & jm)
    tl.store(q_dst + HALF, q2, mask=(hq < NUM_HEADS) & jm)
    hk = tl.arange(0, BLOCK_KV)[:, None]
    kv_mask = (hk < NUM_KV_HEADS) & jm
    k1, k2 = _norm_rotate(k_ptr, kw_ptr, t, stride_kt, stride_kh, c1, c2, s1, s2, eps, dt,
                          NUM_KV_HEADS, HALF, BLOCK_KV, BLOCK_HALF, NORM)
    k_dst = k_out_ptr + t * NUM_KV_HEADS * 2 * HALF + hk * 2 * HALF + j
    tl.store(k_dst, k1, mask=kv_mask)
    tl.store(k_dst + HALF, k2, mask=kv_mask)
    if CACHE:
        slot = tl.load(slot_ptr + t)
        if slot >= 0:  # -1: a padding token, nothing to write
            dst = slot * stride_cs + hk * stride_ch + j
            cache_dt = k_cache_ptr.dtype.element_ty
            tl.store(k_cache_ptr + dst, k1.to(cache_dt), mask=kv_mask)
            tl.store(k_cache_ptr + dst + HALF, k2.to(cache_dt), mask=kv_mask)
            v_src = v_ptr + t * stride_vt + hk * stride_vh + j
            tl.store(v_cache_ptr + dst, tl.load(v_src, mask=kv_mask).to(cache_dt), mask=kv_mask)
            tl.store(v_cache_ptr + dst + HALF, tl.load(v_src + HALF, mask=kv_mask).to(cache_dt), mask=kv_mask)


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
