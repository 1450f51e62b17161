"""Fast mode's projections for steps of a few tokens (up to `dispatch.SMALL_BATCH_MAX_ROWS`), with the pointwise op
before them fused into the GEMM's prologue: a batch-1 decode step is launch-bound (every kernel 5-10 us on the H200),
so each fusion takes one launch per layer off, and these tiles (no split-K) leave no cuBLAS split-K reduce behind.

- `norm_linear`: (x + residual) -> RMSNorm -> @ W^T. A first pass over K sums each row's squares for its rstd; the
  GEMM loop then normalises each K chunk as it loads it, in `reference.rms_norm`'s cast order (the sum rounded to
  the input dtype, variance in float32, the normalised value rounded to the input dtype before the weight
  multiplies it, that product rounded too). The programs of the first column tile write the sum (the new residual).
- `silu_mul_linear`: silu(gate) * up -> @ W^T, each K chunk of the activation made as `silu_and_mul` rounds it.

Operands go through tl.dot with float32 sums (fp16/bf16 on the tensor cores; float32 as IEEE products, not tf32).
`*_reference` are the unfused compositions of the reference ops, for tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from parity.kernels import reference
from parity.kernels.triton.attention import _dot
from parity.kernels.triton.elementwise import silu_mul
from parity.kernels.triton.norm import add_residual, scale_normalised

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _residual_sum(x_ptr, r_ptr, rows, kk, mask, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual) of rows x columns kk, rounded to x's dtype as torch's add rounds it."""
    x = tl.load(x_ptr + rows * stride_xm + kk, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = add_residual(x, tl.load(r_ptr + rows * stride_rm + kk, mask=mask, other=0.0))
    return x


@triton.jit
def _silu_mul_chunk(g_ptr, rows, kk, mask, stride_gm, K):
    """silu(gate) * up of rows x columns kk, gate in columns [0, K) and up in [K, 2K), rounded as `silu_and_mul`."""
    gate = tl.load(g_ptr + rows * stride_gm + kk, mask=mask, other=0.0)
    up = tl.load(g_ptr + rows * stride_gm + K + kk, mask=mask, other=0.0)
    return silu_mul(gate, up, gate.dtype)


# Row counts are never specialised on: Triton compiles a separate variant for an int equal to 1 or divisible by 16.
@triton.jit(do_not_specialize=["M"])
def _prologue_linear_kernel(
    a_ptr, r_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, res_out_ptr, M, N, K, stride_am, stride_rm, stride_wn, stride_ym, eps,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y = prologue(a) @ W^T (+ b): NORM, RMSNorm of a (+ residual, the sum written to res_out); else SiLU-and-mul
    of a = [gate | up]."""
    pid_n = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m[:, None].to(tl.int64)
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[None, :] < N
    if NORM:
        squares = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = (k0 + offs_k)[None, :]
            h = _residual_sum(a_ptr, r_ptr, rows, kk, m_mask & (kk < K), stride_am, stride_rm, HAS_RESIDUAL)
            h = h.to(tl.float32)
            squares += tl.sum(h * h, axis=1)
        rstd = tl.rsqrt(squares / K + eps)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + offs_k)[None, :]
        a_mask = m_mask & (kk < K)
        if NORM:
            h = _residual_sum(a_ptr, r_ptr, rows, kk, a_mask, stride_am, stride_rm, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                if pid_n == 0:
                    tl.store(res_out_ptr + rows * K + kk, h, mask=a_mask)
            nw = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            a = scale_normalised(h.to(tl.float32), rstd, nw, h.dtype).to(h.dtype)
        else:
            a = _silu_mul_chunk(a_ptr, rows, kk, a_mask, stride_am, K)
        kt = k0 + offs_k[:, None]
        b = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + kt, mask=n_mask & (kt < K), other=0.0)
        acc += _dot(a, b)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_mask & n_mask)


def tiles(k: int) -> dict:
    """Tiles for an [M, k] x [k, n] product, M <= 16 in one row of programs: 16 x 32 outputs per program, 128-deep
    K steps (64 when k is not a multiple of 128), as fast as cuBLAS at batch 1 on the H200 for Qwen3-0.6B's
    projections (tl.dot GEMMs measured in CUDA-graph replays)."""
    if INTERPRET:  # few, large programs: the CPU interpreter's cost is per program and per op
        return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128 if k % 128 == 0 else 64, num_warps=4, num_stages=4)


def _check_operands(name: str, tensors: dict[str, torch.Tensor | None]) -> None:
    """Rows as a matrix, one dtype for every operand (the prologue rounds to it) and unit column strides."""
    given = {label: t for label, t in tensors.items() if t is not None}
    first, rows = next(iter(given.items()))
    if rows.dim() != 2:
        raise ValueError(f"{name}: {first} must be [rows, features], got shape {tuple(rows.shape)}")
    dtypes = {t.dtype for t in given.values()}
    if len(dtypes) != 1:
        raise ValueError(f"{name}: every operand must have one dtype, got "
                         + ", ".join(f"{label} {t.dtype}" for label, t in given.items()))
    strided = [label for label, t in given.items() if t.stride(-1) != 1]
    if strided:
        raise ValueError(f"{name}: {', '.join(strided)} must be contiguous in the last dimension")


def _launch(a, residual, norm_weight, eps, weight, bias, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    m, n = a.shape[0], weight.shape[0]
    y = torch.empty(m, n, dtype=a.dtype, device=a.device)
    res_out = torch.empty(m, k, dtype=a.dtype, device=a.device) if residual is not None else None
    if m:
        cfg = tiles(k)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _prologue_linear_kernel[grid](
            a, residual if residual is not None else a, norm_weight if norm_weight is not None else weight, weight,
            bias if bias is not None else weight, y, res_out if res_out is not None else y,
            m, n, k, a.stride(0), residual.stride(0) if residual is not None else 0, weight.stride(0), y.stride(0),
            float(eps), NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            **cfg,
        )
    return y, res_out


def norm_linear(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) @ weight^T (+ bias), x + residual) in one launch, as `norm_linear_reference`.
    Without `residual` the second result is x itself (the first layer's residual is its input)."""
    _check_operands("norm_linear", dict(x=x, residual=residual, norm_weight=norm_weight, weight=weight, bias=bias))
    k = x.shape[-1]
    if weight.shape[-1] != k or norm_weight.shape != (k,):
        raise ValueError(f"norm_linear: x has {k} features but the norm weight is {tuple(norm_weight.shape)} "
                         f"and the weight {tuple(weight.shape)}")
    y, res_out = _launch(x, residual, norm_weight, eps, weight, bias, k)
    return y, x if res_out is None else res_out


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T (+ bias) from gate_up = [gate | up] in one launch, as `silu_mul_linear_reference`."""
    _check_operands("silu_mul_linear", dict(gate_up=gate_up, weight=weight, bias=bias))
    k = weight.shape[-1]
    if gate_up.shape[-1] != 2 * k:
        raise ValueError(f"silu_mul_linear: gate_up has {gate_up.shape[-1]} columns, the weight {tuple(weight.shape)} "
                         f"takes {k} (gate_up must hold gate then up, {2 * k} columns)")
    return _launch(gate_up, None, None, 0.0, weight, bias, k)[0]


def norm_linear_reference(x, residual, norm_weight, eps, weight, bias=None):
    """`norm_linear` unfused: the reference norm (with the residual add), then the reference linear."""
    if residual is None:
        return reference.linear(reference.rms_norm(x, norm_weight, eps), weight, bias), x
    normed, residual = reference.rms_norm(x, norm_weight, eps, residual)
    return reference.linear(normed, weight, bias), residual


def silu_mul_linear_reference(gate_up, weight, bias=None):
    """`silu_mul_linear` unfused: the reference SiLU-and-mul, then the reference linear."""
    return reference.linear(reference.silu_and_mul(gate_up), weight, bias)
