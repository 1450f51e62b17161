"""The kernel dispatch table: every (mode, device, autograd) cell names a module offering the whole op set."""

from __future__ import annotations

import importlib
import importlib.util
import itertools

import pytest
import torch

from parity.kernels import dispatch

OPS = ("linear", "linear_fp32", "rms_norm", "apply_rotary", "rope_and_cache", "silu_and_mul", "attention",
       "log_softmax", "gumbel_argmax")


def test_table_covers_every_cell_with_the_whole_op_set():
    assert set(dispatch.IMPLEMENTATIONS) == set(itertools.product(("fast", "deterministic"), ("cpu", "cuda"),
                                                                   (False, True)))
    for name in set(dispatch.IMPLEMENTATIONS.values()):
        if "triton" in name and importlib.util.find_spec("triton") is None:
            continue
        module = importlib.import_module(name)
        assert all(callable(getattr(module, op, None)) for op in OPS), name


def test_cpu_calls_route_by_mode_and_autograd():
    x = torch.randn(3, 8)
    w = torch.randn(8, requires_grad=True)
    assert dispatch.implementation("fast", x).__name__ == "parity.kernels.reference"
    assert dispatch.implementation("deterministic", x, w).__name__ == "parity.kernels.invariant_autograd"
    assert dispatch.implementation("deterministic", x).__name__ == "parity.kernels.invariant"
    with torch.no_grad():
        assert not dispatch.needs_grad(x, w)
    assert dispatch.needs_grad(x, None, w)


@pytest.mark.parametrize("deterministic", [False, True])
def test_kernels_compute_the_ops_on_cpu(deterministic):
    """Each mode's CPU implementation against float64 formulas written out here."""
    kernels = dispatch.Kernels(deterministic=deterministic)
    g = torch.Generator().manual_seed(0)
    x, w, gain = torch.randn(5, 16, generator=g), torch.randn(12, 16, generator=g), torch.rand(16, generator=g) + 0.5
    close = dict(rtol=1e-5, atol=1e-5)  # float32 arithmetic against float64
    torch.testing.assert_close(kernels.linear(x, w).double(), x.double() @ w.double().T, **close)
    rms = x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True) + 1e-6) * gain.double()
    torch.testing.assert_close(kernels.rms_norm(x, gain, 1e-6).double(), rms, **close)
    logits = torch.randn(4, 50, generator=g)
    expected = logits.double() - logits.double().exp().sum(-1, keepdim=True).log()
    torch.testing.assert_close(kernels.log_softmax(logits).double(), expected, **close)
