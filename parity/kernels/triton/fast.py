"""Fast mode on CUDA without autograd: Triton kernels for the norm, RoPE (fused with the per-head q/k norm
and the KV-cache write), SiLU, attention, sampling and the MoE routing and experts (`moe.py`); cuBLAS (torch)
for the matmuls (a few-row matmul takes a Triton kernel where one measures faster)
and the log-softmax.
Same signatures as `reference.py`."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from parity.kernels import reference
from parity.kernels.reference import log_softmax
from parity.kernels.triton import gemv, invariant
from parity.kernels.triton.attention import attention
from parity.kernels.triton.elementwise import apply_rotary, rope_and_cache, silu_and_mul
from parity.kernels.triton.moe import fused_moe, moe_route
from parity.kernels.triton.norm import rms_norm
from parity.kernels.triton.sampling import gumbel_argmax

__all__ = ["apply_rotary", "attention", "fused_moe", "gumbel_argmax", "linear", "linear_fp32", "log_softmax",
           "moe_route", "rms_norm", "rope_and_cache", "silu_and_mul"]

# Up to this many rows a matmul may leave cuBLAS for a Triton kernel: the deterministic kernel's narrow tile (its
# 16-row BLOCK_M) or, up to gemv.MAX_ROWS rows, the matrix-vector kernel. benchmarks/invariant_linear_sweep.py on
# the H200 (bf16, Qwen3-0.6B shapes, CUDA-graph replays): at M = 1 cuBLAS runs the o projection (1024 x 2048) in
# 12.5 us against 5.2 us at M = 8, the narrow tile in 5.5 us (in the engine: the batch-1 step's o projections
# 258 -> 175 us); for the other projections the two are within 0.96-1.14x. Which kernel is fastest depends on the
# shape and the GPU, so each (rows, weight shape) is timed once, outside any capture, and a Triton kernel is taken
# only when clearly faster than cuBLAS.
FEW_ROWS = 16
FASTER_MARGIN = 0.8  # a Triton kernel's time / cuBLAS's below which it is taken (a near tie keeps cuBLAS)
AGREEMENT = 1e-2  # relative L2 distance from cuBLAS's output above which a kernel is refused (bf16: ~1e-3)
# The few-row kernels are timed reading weights from HBM, as a decode step does (every layer's weights pass through
# once; an H100/H200 L2 holds 50 MB): each timed call reads another copy of the weight, `COLD_BYTES` of copies in all.
COLD_BYTES = 96 * 2**20
MAX_COLD_COPIES = 32  # a weight of a few KB (a test model's) stays in cache whatever the count; 32 keeps timing quick
FEW_ROW_KERNELS: dict[str, Callable] = {"cublas": F.linear, "narrow_tile": invariant.linear, "gemv": gemv.gemv}
_FEW_ROW_CHOICE: dict[tuple, str] = {}


def _graph_time(fn: Callable[[], object], reps: int = 5) -> float:
    """Milliseconds for `reps` back-to-back calls replayed from a CUDA graph (eager launches of a few-us kernel
    would time the host)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may launch meanwhile
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


def few_row_kernel(m: int, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """The name in FEW_ROW_KERNELS of the fastest kernel for [m, K] x weight^T, timed on first sight of the shape
    (the engine runs each CUDA-graph batch size once uncaptured before capturing it)."""
    key = (m, tuple(weight.shape), weight.dtype, weight.device, bias is not None)
    if key not in _FEW_ROW_CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return "cublas"  # cannot time here; cuBLAS, without caching the answer
        x = torch.randn(m, weight.shape[1], dtype=weight.dtype, device=weight.device)
        names = [name for name in FEW_ROW_KERNELS if name != "gemv" or m <= gemv.MAX_ROWS]
        expected = F.linear(x, weight, bias).float()
        for name in [name for name in names if name != "cublas"]:  # one that disagrees with cuBLAS is never taken
            err = ((FEW_ROW_KERNELS[name](x, weight, bias).float() - expected).norm() / expected.norm()).item()
            if not err < AGREEMENT:
                warnings.warn(f"fast linear: {name} differs from cuBLAS by {err:.2e} (relative) at {m} rows x "
                              f"{tuple(weight.shape)}; not used for this shape", RuntimeWarning, stacklevel=2)
                names.remove(name)
        weights = cold_copies(weight)
        times = {name: _graph_time(lambda f=FEW_ROW_KERNELS[name]: [f(x, w, bias) for w in weights]) for name in names}
        del weights
        best = min(times, key=times.get)
        _FEW_ROW_CHOICE[key] = best if times[best] < FASTER_MARGIN * times["cublas"] else "cublas"
    return _FEW_ROW_CHOICE[key]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b): cuBLAS, or for at most FEW_ROWS rows the Triton kernel timed fastest for the shape."""
    rows = x.numel() // x.shape[-1]
    if (0 < rows <= FEW_ROWS and x.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)
            and x.dtype == weight.dtype):
        return FEW_ROW_KERNELS[few_row_kernel(rows, weight, bias)](x, weight, bias)
    return F.linear(x, weight, bias)


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
