"""What the kernel test modules share (not a test module: pytest collects test_*.py only): the devices a kernel
runs on (Triton's CPU interpreter without a GPU, CUDA under `-m gpu`), error bounds per dtype, seeded inputs,
and the matmul operands with their float64 truth. Imported as `from kernel_checks import ...`."""

from __future__ import annotations

import pytest
import torch

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter runs without a GPU")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]
# ||out - ref|| / ||ref|| bounds against float64 truth
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm()).item()


def randn(*shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def operands(rows, n, k, dtype, device, gen, bias):
    """x [rows, k], a weight [n, k] scaled by k**-0.5 (unit-size outputs) and, with `bias`, a bias [n]."""
    x = randn(rows, k, dtype=dtype, device=device, gen=gen)
    w = (randn(n, k, dtype=torch.float32, device=device, gen=gen) * k**-0.5).to(dtype)
    b = randn(n, dtype=dtype, device=device, gen=gen) if bias else None
    return x, w, b


def truth(x, w, b):
    """x W^T (+ b) in float64."""
    return x.double() @ w.double().T + (b.double() if b is not None else 0)


def replays_the_eager_bits_with_dependent_launches(chain, x: torch.Tensor) -> None:
    """chain() (a tensor or a tuple of them) captured in a CUDA graph with dependent launches: a replay reads x as it
    is at replay (zeroed: another first output) and, x restored, gives the eager call's bits."""
    from parity.kernels.dispatch import dependent_launches

    def outputs(out):
        return out if isinstance(out, tuple) else (out,)

    x0 = x.clone()
    eager = outputs(chain())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), dependent_launches():
        replayed = outputs(chain())
    x.zero_()
    graph.replay()
    assert not torch.equal(replayed[0], eager[0])
    x.copy_(x0)
    graph.replay()
    assert all(torch.equal(r, e) for r, e in zip(replayed, eager))
