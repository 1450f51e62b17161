"""Fast mode on CUDA without autograd: Triton kernels for the norm, RoPE (fused with the per-head q/k norm
and the KV-cache write), SiLU, attention, sampling and the MoE routing and experts (`moe.py`); cuBLAS (torch)
for the matmuls and the log-softmax (of a few rows: the chunked Triton kernels). A matmul of a few rows takes a
Triton kernel where one times faster, and at most 4 rows may take one GEMV launch (`gemv.py`) where it times
faster than the unfused ops: a decoder layer's RMSNorm (with the residual add) and the qkv or gate_up projection
after it (`rms_norm_linear`), the gate_up projection and SiLU-and-mul (`linear_silu_and_mul`), or all three.
A decode step's attention kernel also applies RoPE (and the per-head q/k norm) and writes the step's
keys and values (`rope_and_attention`). Same signatures as `reference.py`, plus these three fused ops, which
`Kernels` takes from an implementation that has them."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from parity.kernels import reference
from parity.kernels.dispatch import norm_then_linear
from parity.kernels.triton import gemv, invariant
from parity.kernels.triton.attention import attention, rope_decode, rope_fuses_into_decode
from parity.kernels.triton.elementwise import apply_rotary, fuses, rope_and_cache, silu_and_mul
from parity.kernels.triton.moe import fused_moe, moe_route
from parity.kernels.triton.norm import rms_norm
from parity.kernels.triton.pdl import dependent_launches
from parity.kernels.triton.sampling import gumbel_argmax

__all__ = ["apply_rotary", "argmax_logprob", "attention", "fused_moe", "gumbel_argmax", "linear", "linear_fp32",
           "linear_silu_and_mul", "log_softmax", "moe_route", "rms_norm", "rms_norm_linear", "rope_and_attention",
           "rope_and_cache", "silu_and_mul"]

# Up to this many rows a matmul may leave cuBLAS for a Triton kernel: the deterministic kernel's narrow tile (its
# 16-row BLOCK_M) or, up to gemv.MAX_ROWS rows, the matrix-vector kernel. benchmarks/invariant_linear_sweep.py on
# the H200 (bf16, Qwen3-0.6B shapes, CUDA-graph replays): at M = 1 cuBLAS runs the o projection (1024 x 2048) in
# 12.5 us against 5.2 us at M = 8, the narrow tile in 5.5 us (in the engine: the batch-1 step's o projections
# 258 -> 175 us); for the other projections the two are within 0.96-1.14x. Which kernel is fastest depends on the
# shape and the GPU, so each (rows, weight shape) is timed once, outside any capture, and a Triton kernel is taken
# only when clearly faster than cuBLAS.
FEW_ROWS = 16  # at most the engine's DEPENDENT_LAUNCH_MAX_BATCH: a graph's few-row matmuls run under PDL
# A Triton kernel's time / cuBLAS's below which it is taken (a near tie keeps cuBLAS). 0.85: on the H200
# (2026-12-02) the GEMV ran Qwen3-0.6B's down projection (1024 x 3072) at one row in 5.53 us against cuBLAS's split-K
# pair's 6.68 us (0.83x, each an average over 160 calls), which 0.8 refused. Those were plain launches; timed under
# dependent launch as now (`_graph_time`), the same GEMV took 4.66 against 6.65 us (0.70x, 2026-12-03).
FASTER_MARGIN = 0.85
# A fused kernel's time / the unfused pair's below which it is taken: the two round alike, so only timing noise
# argues for the pair, and in a step's graph the fused one also saves the launch gap the timing half hides.
FUSED_MARGIN = 0.97
AGREEMENT = 1e-2  # relative L2 distance from cuBLAS's output above which a kernel is refused (bf16: ~1e-3)
# The few-row kernels are timed reading weights from HBM, as a decode step does (every layer's weights pass through
# once; an H100/H200 L2 holds 50 MB): each timed call reads another copy of the weight, `COLD_BYTES` of copies in all.
COLD_BYTES = 96 * 2**20
MAX_COLD_COPIES = 32  # a weight of a few KB (a test model's) stays in cache whatever the count; 32 keeps timing quick
FEW_ROW_KERNELS: dict[str, Callable] = {"cublas": F.linear, "narrow_tile": invariant.linear, "gemv": gemv.gemv}
_FEW_ROW_CHOICE: dict[tuple, str] = {}
_FEW_ROW_TIMES: dict[tuple, dict[str, float]] = {}  # each timed key's candidates, microseconds a call


TIMED_REPS = 5


def _graph_time(fn: Callable[[], object], reps: int = TIMED_REPS) -> float:
    """Milliseconds for `reps` back-to-back calls replayed from a CUDA graph (eager launches of a few-us kernel
    would time the host), captured with programmatic dependent launch as the decode graphs that run few-row
    matmuls are (FEW_ROWS): the Triton kernels then overlap their launches (the narrow tile, deterministic mode's
    kernel, also prefetches its weights), cuBLAS's do not, and a choice timed without it mistook a near tie for
    cuBLAS's win."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # other threads may launch meanwhile: thread-local capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"), dependent_launches():
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def cold_copies(weight: torch.Tensor, total_bytes: int = COLD_BYTES) -> list[torch.Tensor]:
    """`weight` and enough copies of it to pass `total_bytes`, so cycling through them reads HBM (a weight larger
    than that alone). Where memory is short (the KV cache took it), fewer copies: the timing is then L2-warm, never
    a failure."""
    count = min(MAX_COLD_COPIES, -(-total_bytes // max(1, weight.numel() * weight.element_size())))
    copies = [weight]
    try:
        copies += [weight.clone() for _ in range(count - 1)]
    except torch.cuda.OutOfMemoryError:
        pass
    return copies


def _outputs(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _timed_choice(op: str, m: int, candidates: dict[str, Callable], weight: torch.Tensor,
                  bias: torch.Tensor | None, *, margin: float, residual: bool = False) -> str:
    """The name of the fastest of `candidates` (each fn(x, weight, bias), or with `residual` fn(x, weight, bias,
    residual) for a residual like x; the first is the baseline) for `op` on [m, K] x weight, timed once per (m, op,
    the weight's shape, dtype and device, whether there is a bias) on random inputs and cold copies of the weight;
    with `residual` the op is keyed as `op + "+residual"`, so a choice timed without a residual never serves a call
    with one. A candidate whose output (each of them, for a tuple) differs from the baseline's by more than
    AGREEMENT, or that raises, is never taken; another is taken only below `margin` x the baseline's time.
    Inside a CUDA-graph capture nothing can be timed: the baseline, without caching the answer (the engine runs
    each graph's batch size once uncaptured before capturing it)."""
    baseline = next(iter(candidates))
    op = f"{op}+residual" if residual else op
    key = (m, op, tuple(weight.shape), weight.dtype, weight.device, bias is not None)
    if key not in _FEW_ROW_CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return baseline
        x = torch.randn(m, weight.shape[1], dtype=weight.dtype, device=weight.device)
        extra = (torch.randn_like(x),) if residual else ()
        # the baseline eagerly first: nested choices (its own few-row matmuls) are made here
        expected = [t.float() for t in _outputs(candidates[baseline](x, weight, bias, *extra))]
        names = [baseline]
        for name in list(candidates)[1:]:
            try:
                outputs = _outputs(candidates[name](x, weight, bias, *extra))
                err = max(((got.float() - want).norm() / want.norm()).item() for got, want in zip(outputs, expected))
                problem = None if err < AGREEMENT else f"differs from {baseline} by {err:.2e} (relative)"
            except Exception as e:  # noqa: BLE001 -- e.g. a Triton that cannot compile it: the baseline serves
                problem = f"failed ({type(e).__name__}: {e})"
            if problem is None:
                names.append(name)
            else:
                warnings.warn(f"fast {op}: {name} {problem} at {m} rows x {tuple(weight.shape)}; not used "
                              "for this shape", RuntimeWarning, stacklevel=3)
        weights = cold_copies(weight)
        times = {name: _graph_time(lambda f=candidates[name]: [f(x, w, bias, *extra) for w in weights])
                 for name in names}
        calls = TIMED_REPS * len(weights)
        del weights
        _FEW_ROW_TIMES[key] = {name: t * 1e3 / calls for name, t in times.items()}
        best = min(times, key=times.get)
        _FEW_ROW_CHOICE[key] = best if times[best] < margin * times[baseline] else baseline
    return _FEW_ROW_CHOICE[key]


def few_row_kernel(m: int, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The name in FEW_ROW_KERNELS of the fastest kernel for [m, K] x weight^T, timed on first sight of the shape."""
    names = [name for name in FEW_ROW_KERNELS if name != "gemv" or m <= gemv.MAX_ROWS]
    return _timed_choice("linear", m, {name: FEW_ROW_KERNELS[name] for name in names}, weight, bias,
                         margin=FASTER_MARGIN)


def few_row_choices() -> list[dict]:
    """Every timed few-row choice so far: the op, rows, weight shape, the kernel taken and each candidate's
    microseconds a call (weights from HBM), for benchmark reports."""
    choices = []
    for key, chosen in _FEW_ROW_CHOICE.items():
        rows, op, shape, _, _, has_bias = key
        times = {name: round(t, 2) for name, t in _FEW_ROW_TIMES.get(key, {}).items()}
        choices.append({"op": op, "rows": rows, "weight": list(shape), "bias": has_bias, "chosen": chosen, "us": times})
    return choices


def _few_rows(x: torch.Tensor, weight: torch.Tensor, max_rows: int) -> int:
    """x's row count where a few-row kernel may serve it (CUDA, fp16/bf16 operands alike), else 0."""
    rows = x.numel() // x.shape[-1]
    ok = x.is_cuda and weight.dtype in (torch.float16, torch.bfloat16) and x.dtype == weight.dtype
    return rows if ok and 0 < rows <= max_rows else 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b): cuBLAS, or for at most FEW_ROWS rows the Triton kernel timed fastest for the shape."""
    if rows := _few_rows(x, weight, FEW_ROWS):
        return FEW_ROW_KERNELS[few_row_kernel(rows, weight, bias)](x, weight, bias)
    return F.linear(x, weight, bias)


def _linear_then_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return silu_and_mul(linear(x, weight, bias))


# SiLU-and-mul after the gate_up projection: the unfused pair, or for at most gemv.MAX_ROWS rows the GEMV with it as
# its epilogue (one launch fewer a layer), where timed faster.
GATE_UP_KERNELS: dict[str, Callable] = {"pair": _linear_then_silu_and_mul, "fused_gemv": gemv.gemv_silu_and_mul}


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu_and_mul(linear(x, weight, bias)) for weight [2I, K] holding gate rows then up rows."""
    if rows := _few_rows(x, weight, gemv.MAX_ROWS):
        name = _timed_choice("gate_up", rows, GATE_UP_KERNELS, weight, bias, margin=FUSED_MARGIN)
        return GATE_UP_KERNELS[name](x, weight, bias)
    return _linear_then_silu_and_mul(x, weight, bias)


def _rms_norm_then_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                          bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                          silu_and_mul: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return norm_then_linear(rms_norm, linear_silu_and_mul if silu_and_mul else linear, x, norm_weight, eps, weight,
                            bias, residual)


# RMSNorm (with the residual add) and the projection that reads it (with `silu_and_mul`: the gate_up projection and
# SiLU-and-mul): the unfused pair, or for at most gemv.MAX_ROWS rows one GEMV launch with the norm as its prologue
# (and SiLU-and-mul as its epilogue), where timed faster. Each fn(x, norm_weight, eps, weight, bias, residual,
# silu_and_mul=).
NORM_LINEAR_KERNELS: dict[str, Callable] = {"pair": _rms_norm_then_linear, "fused_gemv": gemv.rms_norm_gemv}


def _norm_candidate(fn: Callable, norm_weight: torch.Tensor, eps: float, silu_and_mul: bool) -> Callable:
    """A NORM_LINEAR_KERNELS entry as `_timed_choice` calls a candidate: fn(x, weight, bias[, residual])."""
    return lambda x, weight, bias, residual=None: fn(x, norm_weight, eps, weight, bias, residual,
                                                     silu_and_mul=silu_and_mul)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                    silu_and_mul: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """linear (with `silu_and_mul`: linear_silu_and_mul) of rms_norm(x, norm_weight, eps, residual); y, or
    (y, x + residual) with a residual, as rms_norm returns. The fused GEMV serves only operands of one dtype, so
    its output's dtype is the pair's."""
    same_dtype = norm_weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)
    if same_dtype and (rows := _few_rows(x, weight, gemv.MAX_ROWS)):
        candidates = {name: _norm_candidate(fn, norm_weight, eps, silu_and_mul)
                      for name, fn in NORM_LINEAR_KERNELS.items()}
        op = "norm_gate_up" if silu_and_mul else "norm_linear"
        name = _timed_choice(op, rows, candidates, weight, bias, residual=residual is not None, margin=FUSED_MARGIN)
        return NORM_LINEAR_KERNELS[name](x, norm_weight, eps, weight, bias, residual, silu_and_mul=silu_and_mul)
    return _rms_norm_then_linear(x, norm_weight, eps, weight, bias, residual, silu_and_mul)


# A greedy sample: deterministic mode's one pass over the logits, the chunked log-softmax's values at the argmax (the
# same bits as `log_softmax` below up to FEW_ROWS rows, within 1e-6 of torch's above).
argmax_logprob = invariant.argmax_logprob


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """torch's, or for at most FEW_ROWS rows deterministic mode's chunked Triton kernels (`invariant.log_softmax`,
    within 1e-6 of torch's): torch runs a row on one SM, 34 us for 151,936 float32 logits at batch 1 on the H200,
    where the chunks spread it over ~19 programs (deterministic mode's batch-1 trace: 4.2 us for the first of its
    two kernels, the second under 3.4 us)."""
    rows = logits.shape[0] if logits.dim() == 2 else 0
    if logits.is_cuda and logits.dtype == torch.float32 and 0 < rows <= FEW_ROWS:
        return invariant.log_softmax(logits)
    return reference.log_softmax(logits)


_MM_OUT_DTYPE = [True]  # torch.mm(out_dtype=) on CUDA exists from torch 2.8; older builds upcast instead


def mm_fp32_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T from fp16/bf16 operands with float32 accumulation and output (cuBLAS, no fp32 weight copy)."""
    if _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).reshape(*x.shape[:-1], -1)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    return reference.linear_fp32(x, weight)


def linear_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T with float32 products, sums and output: the same maths as upcasting both first,
    without materialising a float32 copy of the weight (600 MB for a 151936 x 1024 LM head)."""
    if x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16):
        return mm_fp32_out(x, weight)
    return reference.linear_fp32(x, weight)


def rope_and_attention(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, meta, scale):
    """`rope_and_cache`, then `attention`. A decode step over the paged cache does both in its attention kernel
    (`attention.rope_decode`: the same code and rounding steps, one launch a layer fewer)."""
    if fuses(q, k, v, cos, q_weight, k_weight) and rope_fuses_into_decode(q, k, v, cos, sin, kv_cache, meta):
        return rope_decode(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, meta, scale)
    q, k = rope_and_cache(q, k, v, cos, sin, q_weight, k_weight, eps, kv_cache, meta.slot_mapping)
    return attention(q, k, v, kv_cache, meta, scale)
