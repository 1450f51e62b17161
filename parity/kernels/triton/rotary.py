"""Triton pieces of rotary embedding that kernels inline: a token's cos/sin halves, and heads RMS-normalised
(Qwen3's per-head q/k norm) and rotated with torch's rounding. `elementwise.rope_and_cache` and fast mode's
decode attention (which rotates its own query and writes its step's key, `attention.rope_decode`) share them, so
both give the same bits."""

from __future__ import annotations

import triton
import triton.language as tl

from parity.kernels.triton.norm import scale_normalised


@triton.jit
def cos_sin_halves(cos_ptr, sin_ptr, t, stride_ct, stride_st, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Token t's cos and sin, each as its two halves [1, BLOCK_HALF] in float32."""
    j = tl.arange(0, BLOCK_HALF)[None, :]
    jm = j < HALF
    c1 = tl.load(cos_ptr + t * stride_ct + j, mask=jm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + j, mask=jm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_st + j, mask=jm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_st + HALF + j, mask=jm, other=0.0).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def norm_rotate(x_ptr, w_ptr, t, stride_t, stride_h, c1, c2, s1, s2, eps, dt: tl.constexpr,
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
def store_rotated_kv(k_cache_ptr, v_cache_ptr, dst, k1, k2, v_src, mask, HALF: tl.constexpr):
    """A token's rotated key halves and its value (read at `v_src`) into the K and V caches at offsets `dst` (the
    two caches share a layout), in the caches' dtype."""
    cache_dt = k_cache_ptr.dtype.element_ty
    tl.store(k_cache_ptr + dst, k1.to(cache_dt), mask=mask)
    tl.store(k_cache_ptr + dst + HALF, k2.to(cache_dt), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_src, mask=mask).to(cache_dt), mask=mask)
    tl.store(v_cache_ptr + dst + HALF, tl.load(v_src + HALF, mask=mask).to(cache_dt), mask=mask)
