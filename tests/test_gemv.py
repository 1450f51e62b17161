"""The few-row matrix-vector kernel (`triton/gemv.py`) against float64 truth on random inputs.

Without a GPU it runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py) at small sizes;
`pytest -m gpu` runs the same checks on CUDA at Qwen3-0.6B's projection shapes. Error bounds (kernel_checks.TOL, as in
test_kernels.py): ||out - ref|| / ||ref|| under 1e-2 for bf16, 2e-3 for fp16, 1e-5 for fp32.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import DEVICES, TOL, operands, randn, rel_err, truth  # noqa: E402

from parity.kernels.triton import gemv as tg  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (N, K): odd sizes that fill no block, and projection-like shapes (qkv, o, gate_up, down); on CUDA Qwen3-0.6B's own.
CPU_SHAPES = [(100, 300), (512, 128), (128, 256), (768, 128), (128, 384)]
CUDA_SHAPES = [(100, 300), (4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(device, dtype, rows, bias):
    gen = torch.Generator().manual_seed(21 + rows)
    for n, k in CPU_SHAPES if device == "cpu" else CUDA_SHAPES:
        x, w, b = operands(rows, n, k, dtype, device, gen, bias)
        out = tg.gemv(x, w, b)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert rel_err(out, truth(x, w, b)) < TOL[dtype], (n, k)


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_leading_dims_and_strided_rows(device):
    """x [..., K] flattens to its rows; rows with a stride wider than K (a view of a wider tensor) are read in place;
    a 1-D x is one row."""
    gen = torch.Generator().manual_seed(30)
    n, k = 100, 300
    wide = randn(4, 2 * k, dtype=torch.bfloat16, device=device, gen=gen)
    _, w, b = operands(1, n, k, torch.bfloat16, device, gen, True)
    x = wide[:, :k]
    assert x.stride(0) == 2 * k
    assert rel_err(tg.gemv(x, w, b), truth(x, w, b)) < TOL[torch.bfloat16]
    x3 = x.reshape(2, 2, k)
    out = tg.gemv(x3, w, b)
    assert out.shape == (2, 2, n) and rel_err(out, truth(x3, w, b)) < TOL[torch.bfloat16]
    out = tg.gemv(x[0], w)
    assert out.shape == (n,) and rel_err(out, truth(x[0], w, None)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_masked_rows_leave_the_rest_alone(device):
    """3 rows run the 4-row variant with the fourth masked: they get the bits they get next to a real fourth row,
    and the output has exactly 3 rows."""
    gen = torch.Generator().manual_seed(31)
    x, w, b = operands(4, 100, 300, torch.float32, device, gen, True)
    three = tg.gemv(x[:3], w, b)
    assert three.shape == (3, 100)
    assert torch.equal(three, tg.gemv(x, w, b)[:3])


def test_gemv_rejects_more_than_max_rows():
    gen = torch.Generator().manual_seed(32)
    x, w, _ = operands(tg.MAX_ROWS + 1, 16, 32, torch.float32, "cpu", gen, False)
    with pytest.raises(ValueError, match=r"at most 4 rows, got 5"):
        tg.gemv(x, w)
    with pytest.raises(ValueError, match=r"got 6"):
        tg.gemv(x[:3].repeat(2, 1).reshape(2, 3, 32), w)
    with pytest.raises(ValueError, match="does not match"):
        tg.gemv(x[:1], w[:, :16])


def test_gemv_config_spreads_qwen3_06b_projections_over_programs():
    """The GPU choices (whatever the interpreter takes): even a 1024-column projection gets >= 64 programs; blocks
    are powers of two no deeper than K needs."""
    for (n, k), rows in itertools.product([(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (100, 40)], [1, 4]):
        cfg = tg._device_config(n, k, rows)
        assert (n < 1024 or -(-n // cfg["BLOCK_N"]) >= 64), (n, k, cfg)
        for block in (cfg["BLOCK_N"], cfg["BLOCK_K"]):
            assert block & (block - 1) == 0
        assert cfg["BLOCK_K"] <= max(16, triton_next_pow2(k))


def triton_next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3])
def test_gpu_gemv_replays_in_a_cuda_graph(rows):
    """Fast mode's decode steps run as CUDA-graph replays: a captured call gives the eager call's bits."""
    gen = torch.Generator().manual_seed(33)
    x, w, b = operands(rows, 1024, 2048, torch.bfloat16, "cuda", gen, True)
    eager = tg.gemv(x, w, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = tg.gemv(x, w, b)
    graph.replay()
    assert torch.equal(replayed, eager)


@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_at_the_device_launches_matches_float64(rows):
    """The GPU's block choices (`_device_config`: 4-column programs, K chunks up to 2048 deep) at sizes
    that fill no block, so their masks are checked here too, in the interpreter or compiled."""
    gen = torch.Generator().manual_seed(31)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for n, k in [(4100, 300), (1030, 2100), (100, 3000)]:
        x, w, b = operands(rows, n, k, torch.bfloat16, device, gen, bias=True)
        out = tg.gemv(x, w, b, tg._device_config(n, k, rows))
        assert rel_err(out, truth(x, w, b)) < TOL[torch.bfloat16], (n, k)


@pytest.mark.gpu
def test_gpu_dependent_launches_in_a_graph_give_the_eager_bits():
    """A chain of kernels where each reads the previous one's output (norm -> GEMV -> SiLU -> GEMV), captured with
    programmatic dependent launch as the small-batch decode graphs are: the replay gives the eager bits, so every
    kernel waited for its input."""
    from parity.kernels.dispatch import dependent_launches
    from parity.kernels.triton import elementwise as te
    from parity.kernels.triton import norm as tn

    gen = torch.Generator().manual_seed(35)
    x, w_up, _ = operands(1, 6144, 1024, torch.bfloat16, "cuda", gen, False)
    w_down = (randn(1024, 3072, dtype=torch.float32, device="cuda", gen=gen) * 3072**-0.5).bfloat16()
    norm_w = randn(1024, dtype=torch.bfloat16, device="cuda", gen=gen)
    x0 = x.clone()

    def chain():
        h = tn.rms_norm(x, norm_w, 1e-6)
        return tg.gemv(te.silu_and_mul(tg.gemv(h, w_up)), w_down)

    eager = chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), dependent_launches():
        replayed = chain()
    x.zero_()  # the replay reads the input as it is now
    graph.replay()
    assert not torch.equal(replayed, eager)
    x.copy_(x0)
    graph.replay()
    assert torch.equal(replayed, eager)
