"""The few-row matrix-vector kernel (`triton/gemv.py`) and its fused variants (RMSNorm before, SiLU-and-mul after)
against float64 truth on random inputs, the fused ones also against the unfused Triton kernels they replace; and fast
mode's choice between the fused norm + projection and the unfused pair (`fast.rms_norm_linear`).

Without a GPU it runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest.py) at small sizes;
`pytest -m gpu` runs the same checks on CUDA at Qwen3-0.6B's projection shapes. Error bounds (kernel_checks.TOL, as in
test_kernels.py): ||out - ref|| / ||ref|| under 1e-2 for bf16, 2e-3 for fp16, 1e-5 for fp32.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from kernel_checks import DEVICES, TOL, operands, randn, rel_err, replays_the_eager_bits_with_dependent_launches, truth  # noqa: E402

from parity.kernels import reference  # noqa: E402
from parity.kernels.triton import elementwise as te  # noqa: E402
from parity.kernels.triton import gemv as tg  # noqa: E402
from parity.kernels.triton import norm as tn  # noqa: E402

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
    # N not a multiple of the 4 columns a program: the tail program's masks (the interpreter's cost is per program)
    shapes = [(4102, 300), (1030, 2100), (102, 3000)] if device == "cuda" else [(42, 300), (30, 2100), (10, 3000)]
    for n, k in shapes:
        x, w, b = operands(rows, n, k, torch.bfloat16, device, gen, bias=True)
        out = tg.gemv(x, w, b, tg._device_config(n, k, rows))
        assert rel_err(out, truth(x, w, b)) < TOL[torch.bfloat16], (n, k)


@pytest.mark.gpu
def test_gpu_dependent_launches_in_a_graph_give_the_eager_bits():
    """A chain of kernels where each reads the previous one's output (norm -> GEMV -> SiLU -> GEMV), captured with
    programmatic dependent launch as the small-batch decode graphs are: the replay gives the eager bits, so every
    kernel waited for its input."""
    from parity.kernels.triton import elementwise as te
    from parity.kernels.triton import norm as tn

    gen = torch.Generator().manual_seed(35)
    x, w_up, _ = operands(1, 6144, 1024, torch.bfloat16, "cuda", gen, False)
    w_down = (randn(1024, 3072, dtype=torch.float32, device="cuda", gen=gen) * 3072**-0.5).bfloat16()
    norm_w = randn(1024, dtype=torch.bfloat16, device="cuda", gen=gen)

    def chain():
        h = tn.rms_norm(x, norm_w, 1e-6)
        return tg.gemv(te.silu_and_mul(tg.gemv(h, w_up)), w_down)

    replays_the_eager_bits_with_dependent_launches(chain, x)


# The fused variants (`rms_norm_gemv`, `gemv_silu_and_mul`) against a float64 composition of the reference ops and
# against the unfused Triton pair they replace. (N, K), N being 2I for gemv_silu_and_mul: under the interpreter's
# 64 x 128 tiles (32 gate columns) one that fills no block; on CUDA also Qwen3-0.6B's qkv and gate_up projections
# (hidden 1024, intermediate 3072).
FUSED_DTYPES = [torch.bfloat16, torch.float16]
FUSED_CPU_SHAPES = [(100, 300)]
FUSED_CUDA_SHAPES = [(100, 300), (4096, 1024), (6144, 1024)]
EPS = 1e-6


def norm_operands(rows, k, dtype, device, gen, residual):
    """An RMSNorm weight near 1 (as trained ones are) and, with `residual`, a residual [rows, k]."""
    norm_w = (1 + 0.2 * randn(k, dtype=torch.float32, device=device, gen=gen)).to(dtype)
    return norm_w, randn(rows, k, dtype=dtype, device=device, gen=gen) if residual else None


def normed64(x, norm_w, res):
    """`reference.rms_norm` in float64: no intermediate rounding."""
    out = reference.rms_norm(x.double(), norm_w.double(), EPS, None if res is None else res.double())
    return out if res is None else out[0]


def near_unfused(out, unfused, dtype) -> bool:
    """The fused and unfused paths round the same values in the same order and differ only where a float32 sum in
    another order (the RMS over K chunks) moves a normalised value across a rounding boundary: one value in a few
    thousand, which then flips the last bit of some outputs (rel. error ~1e-4 in fp16). A wrong cast order is off
    by 3e-4 (fp16) to 5e-3 (bf16)."""
    return rel_err(out, unfused) < TOL[dtype] / 10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_rms_norm_gemv_matches_float64_and_the_unfused_kernels(device, dtype, rows, residual, bias):
    gen = torch.Generator().manual_seed(40 + rows)
    for n, k in FUSED_CPU_SHAPES if device == "cpu" else FUSED_CUDA_SHAPES:
        x, w, b = operands(rows, n, k, dtype, device, gen, bias)
        norm_w, res = norm_operands(rows, k, dtype, device, gen, residual)
        out = tg.rms_norm_gemv(x, norm_w, EPS, w, b, residual=res)
        normed = tn.rms_norm(x, norm_w, EPS, res)
        if residual:
            (out, out_sum), (normed, normed_sum) = out, normed
            assert out_sum.dtype == dtype and torch.equal(out_sum, normed_sum), (n, k)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert rel_err(out, truth(normed64(x, norm_w, res), w, b)) < TOL[dtype], (n, k)
        assert near_unfused(out, tg.gemv(normed, w, b), dtype), (n, k)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_gemv_rounds_the_normalised_value_as_rms_norm(device):
    """bf16 x with a float32 norm weight: `rms_norm` returns float32 (the weight's product left unrounded), and so
    does the fused kernel, so only the rounding of the normalised value to bf16 and the order of float32 sums are
    left to differ: float32 agreement with the unfused pair checks that rounding (leaving it out is off by ~1e-3)."""
    gen = torch.Generator().manual_seed(48)
    x, w, b = operands(3, 100, 300, torch.bfloat16, device, gen, True)
    norm_w, res = norm_operands(3, 300, torch.float32, device, gen, True)
    res = res.bfloat16()
    out, out_sum = tg.rms_norm_gemv(x, norm_w, EPS, w, b, residual=res)
    normed, normed_sum = tn.rms_norm(x, norm_w, EPS, res)
    assert out.dtype == torch.float32 and out_sum.dtype == torch.bfloat16 and torch.equal(out_sum, normed_sum)
    assert rel_err(out, tg.gemv(normed, w, b)) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_silu_and_mul_matches_float64_and_the_unfused_kernels(device, dtype, rows, bias):
    """Against float64 the bound doubles for bf16 under the interpreter: Triton 3.9's interpreter rounds float32 to
    bf16 towards zero (the GPU to nearest), and gate, up, silu and the product are four such roundings, biased
    alike (the unfused pair is off by the same 1.0-1.5e-2)."""
    gen = torch.Generator().manual_seed(50 + rows)
    bound = TOL[dtype] * (2 if device == "cpu" and dtype == torch.bfloat16 else 1)
    for n, k in FUSED_CPU_SHAPES if device == "cpu" else FUSED_CUDA_SHAPES:
        x, w, b = operands(rows, n, k, dtype, device, gen, bias)
        out = tg.gemv_silu_and_mul(x, w, b)
        assert out.dtype == dtype and out.shape == (rows, n // 2)
        assert rel_err(out, reference.silu_and_mul(truth(x, w, b))) < bound, (n, k)
        assert near_unfused(out, te.silu_and_mul(tg.gemv(x, w, b)), dtype), (n, k)


@pytest.mark.parametrize("rows", [1, 3])
def test_fused_at_the_device_launches_match_the_unfused_kernels(rows):
    """The GPU's block choices (4 columns or 2 gate + 2 up columns a program, K chunks of 1024 at one row and 2048 at
    more) at sizes that fill no block: the RMS prologue's and the K loop's masks, in the interpreter or compiled."""
    gen = torch.Generator().manual_seed(55)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, k = 40, 2100
    tiles = tg._device_config(n, k, rows)
    x, w, b = operands(rows, n, k, torch.bfloat16, device, gen, bias=True)
    norm_w, res = norm_operands(rows, k, torch.bfloat16, device, gen, True)
    out, out_sum = tg.rms_norm_gemv(x, norm_w, EPS, w, b, residual=res, tiles=tiles)
    normed, normed_sum = tn.rms_norm(x, norm_w, EPS, res)
    assert torch.equal(out_sum, normed_sum)
    assert near_unfused(out, tg.gemv(normed, w, b, tiles), torch.bfloat16)
    halved = dict(tiles, BLOCK_N=tiles["BLOCK_N"] // 2)  # the default's halving
    out = tg.gemv_silu_and_mul(x, w, b, halved)
    assert near_unfused(out, te.silu_and_mul(tg.gemv(x, w, b, tiles)), torch.bfloat16)
    out, _ = tg.rms_norm_gemv(x, norm_w, EPS, w, b, residual=res, tiles=halved, silu_and_mul=True)
    assert near_unfused(out, te.silu_and_mul(tg.gemv(normed, w, b, tiles)), torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 3])
def test_preloaded_weight_chunks_give_the_loop_s_bits(rows, monkeypatch):
    """Under dependent launch the GEMV loads its first two W chunks before the wait (`pdl.preloads`) and sums them
    before the loop's remaining ones: every variant gives the bits of the plain loop at the GPU's block choices, for
    K of one chunk, of a partial second chunk and of more than two chunks."""
    gen = torch.Generator().manual_seed(59)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 12

    def every_variant():
        outs = [tg.gemv(x, w, b, tiles), tg.gemv_silu_and_mul(x, w, b, halved)]
        outs += tg.rms_norm_gemv(x, norm_w, EPS, w, b, residual=res, tiles=tiles)
        return outs + [tg.rms_norm_gemv(x, norm_w, EPS, w, None, tiles=halved, silu_and_mul=True)]

    for k in [16, 300, 2100] if rows == 1 else [300, 2100, 5000]:
        tiles = tg._device_config(n, k, rows)
        halved = dict(tiles, BLOCK_N=tiles["BLOCK_N"] // 2)
        x, w, b = operands(rows, n, k, torch.bfloat16, device, gen, bias=True)
        norm_w, res = norm_operands(rows, k, torch.bfloat16, device, gen, True)
        monkeypatch.setattr(tg, "preloads", lambda: False)
        loop = every_variant()
        monkeypatch.setattr(tg, "preloads", lambda: True)
        for got, want in zip(every_variant(), loop, strict=True):
            assert torch.equal(got, want), k
        assert rel_err(loop[0], truth(x, w, b)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_leading_dims_and_strided_rows(device):
    """x [..., K] (and the residual) flatten to their rows, read in place with a row stride wider than K; a 1-D x is
    one row. The residual sum comes back in x's shape."""
    gen = torch.Generator().manual_seed(56)
    n, k = 100, 300
    x = randn(4, 2 * k, dtype=torch.bfloat16, device=device, gen=gen)[:, :k].reshape(2, 2, k)
    w = operands(1, n, k, torch.bfloat16, device, gen, False)[1]
    norm_w, res = norm_operands(4, k, torch.bfloat16, device, gen, True)
    out, out_sum = tg.rms_norm_gemv(x, norm_w, EPS, w, residual=res.reshape(2, 2, k))
    normed, normed_sum = tn.rms_norm(x.reshape(4, k), norm_w, EPS, res)
    assert out.shape == (2, 2, n) and out_sum.shape == (2, 2, k) and torch.equal(out_sum.reshape(4, k), normed_sum)
    assert near_unfused(out.reshape(4, n), tg.gemv(normed, w), torch.bfloat16)
    out = tg.gemv_silu_and_mul(x[0, 1], w)
    assert out.shape == (n // 2,)
    assert near_unfused(out, te.silu_and_mul(tg.gemv(x[0, 1], w)), torch.bfloat16)


def test_fused_reject_bad_operands():
    """Each error names the operand and its value."""
    gen = torch.Generator().manual_seed(57)
    x, w, b = operands(tg.MAX_ROWS + 1, 16, 32, torch.bfloat16, "cpu", gen, True)
    norm_w, res = norm_operands(1, 32, torch.bfloat16, "cpu", gen, True)
    with pytest.raises(ValueError, match=r"rms_norm_gemv takes at most 4 rows, got 5"):
        tg.rms_norm_gemv(x, norm_w, EPS, w)
    with pytest.raises(ValueError, match=r"norm_weight of shape \(31,\) does not match x's last dim 32"):
        tg.rms_norm_gemv(x[:1], norm_w[:31], EPS, w)
    with pytest.raises(ValueError, match=r"residual of shape \(2, 32\) does not match x's \(1, 32\)"):
        tg.rms_norm_gemv(x[:1], norm_w, EPS, w, residual=x[:2])
    with pytest.raises(ValueError, match=r"residual of dtype torch.float16 does not match x's torch.bfloat16"):
        tg.rms_norm_gemv(x[:1], norm_w, EPS, w, residual=res.half())
    with pytest.raises(ValueError, match=r"rms_norm_gemv: weight of shape \(16, 31\) does not match x's last dim 32"):
        tg.rms_norm_gemv(x[:1], norm_w, EPS, w[:, :31])
    with pytest.raises(ValueError, match=r"rms_norm_gemv: bias of shape \(15,\) does not match weight's 16 rows"):
        tg.rms_norm_gemv(x[:1], norm_w, EPS, w, b[:15])
    with pytest.raises(ValueError, match=r"gemv_silu_and_mul takes at most 4 rows, got 5"):
        tg.gemv_silu_and_mul(x, w)
    with pytest.raises(ValueError, match=r"weight of shape \(15, 32\) has an odd number of rows, 15"):
        tg.gemv_silu_and_mul(x[:1], w[:15])
    with pytest.raises(ValueError, match=r"rms_norm_gemv: weight of shape \(15, 32\) has an odd number of rows"):
        tg.rms_norm_gemv(x[:1], norm_w, EPS, w[:15], silu_and_mul=True)
    with pytest.raises(ValueError, match=r"gemv_silu_and_mul: bias of shape \(15,\) does not match weight's 16 rows"):
        tg.gemv_silu_and_mul(x[:1], w, b[:15])


@pytest.mark.gpu
def test_gpu_fused_dependent_launches_in_a_graph_give_the_eager_bits():
    """A decoder layer's MLP half at Qwen3-0.6B's sizes from the fused kernels, captured with programmatic dependent
    launch as the small-batch decode graphs are: rms_norm_gemv (residual) -> gemv_silu_and_mul -> gemv -> rms_norm_gemv
    reading the first one's residual sum. The replay gives the eager bits, so every kernel waited for its input, the
    residual sum that program 0 alone writes included."""

    gen = torch.Generator().manual_seed(58)
    x, w_o, _ = operands(1, 1024, 1024, torch.bfloat16, "cuda", gen, False)
    w_gate_up = operands(1, 6144, 1024, torch.bfloat16, "cuda", gen, False)[1]
    w_down = operands(1, 1024, 3072, torch.bfloat16, "cuda", gen, False)[1]
    norm_w, res = norm_operands(1, 1024, torch.bfloat16, "cuda", gen, True)

    def chain():
        h, hidden = tg.rms_norm_gemv(x, norm_w, EPS, w_o, residual=res)
        d = tg.gemv(tg.gemv_silu_and_mul(h, w_gate_up), w_down)
        return tg.rms_norm_gemv(d, norm_w, EPS, w_o, residual=hidden)

    replays_the_eager_bits_with_dependent_launches(chain, x)


# Fast mode's norm + projection (`fast.rms_norm_linear`): the unfused pair (Triton's RMSNorm, then fast mode's linear
# or linear_silu_and_mul) or, at <= 4 rows, one `rms_norm_gemv` launch, timed against each other. On CPU in fp16: the
# interpreter rounds float32 to bf16 towards zero and torch's CPU matmul (the pair's) to nearest, so in bf16 the two
# would differ by the rounding mode alone; fp16 rounds to nearest in both. On CUDA both dtypes.
NORM_LINEAR_CASES = [pytest.param("cpu", torch.float16, marks=DEVICES[0].marks)] + [
    pytest.param("cuda", dtype, marks=DEVICES[1].marks) for dtype in FUSED_DTYPES]


def norm_linear_truth(x, norm_w, res, w, b, silu_and_mul):
    y = truth(normed64(x, norm_w, res), w, b)
    return reference.silu_and_mul(y) if silu_and_mul else y


@pytest.mark.parametrize(("device", "dtype"), NORM_LINEAR_CASES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("silu_and_mul", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_rms_norm_linear_every_kernel_matches_float64_and_the_pair(device, dtype, rows, residual, silu_and_mul,
                                                                        bias):
    """Each candidate matches float64 (twice the bound with SiLU-and-mul: two more roundings); the fused GEMV matches
    the pair as closely as the fused kernels match their unfused pairs, in the pair's dtype and shape, and the
    residual sum bitwise."""
    from parity.kernels.triton import fast

    gen = torch.Generator().manual_seed(60 + rows)
    bound = TOL[dtype] * (2 if silu_and_mul else 1)
    for n, k in FUSED_CPU_SHAPES if device == "cpu" else FUSED_CUDA_SHAPES:
        x, w, b = operands(rows, n, k, dtype, device, gen, bias)
        norm_w, res = norm_operands(rows, k, dtype, device, gen, residual)
        ref = norm_linear_truth(x, norm_w, res, w, b, silu_and_mul)
        outs = {name: fn(x, norm_w, EPS, w, b, res, silu_and_mul=silu_and_mul)
                for name, fn in fast.NORM_LINEAR_KERNELS.items()}
        if residual:
            sums = {name: out[1] for name, out in outs.items()}
            outs = {name: out[0] for name, out in outs.items()}
            assert torch.equal(sums["fused_gemv"], sums["pair"]), (n, k)
        pair = outs["pair"]
        assert pair.dtype == dtype and pair.shape == (rows, n // 2 if silu_and_mul else n)
        for name, out in outs.items():
            assert out.dtype == pair.dtype and out.shape == pair.shape, name
            assert rel_err(out, ref) < bound, (name, n, k)
        assert near_unfused(outs["fused_gemv"], pair, dtype), (n, k)


def test_fast_rms_norm_linear_keys_each_variant_apart_and_runs_the_choice(monkeypatch):
    """fast.rms_norm_linear's few-row path on CPU (its CUDA conditions and the graph timing replaced; each timing
    half the one before, so the last candidate, the fused GEMV, is taken): one choice per op, with a residual or
    without, none reused for another; then each call runs the chosen kernel."""
    from parity.kernels.triton import fast

    def few_rows_on_cpu(x, weight, max_rows):  # fast._few_rows without its CUDA condition
        rows = x.numel() // x.shape[-1]
        return rows if rows <= max_rows else 0

    timings = (2.0**-i for i in itertools.count())
    monkeypatch.setattr(fast, "_few_rows", few_rows_on_cpu)
    monkeypatch.setattr(fast, "_graph_time", lambda fn: next(timings))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build's raises
    monkeypatch.setattr(fast, "_FEW_ROW_CHOICE", {})
    gen = torch.Generator().manual_seed(61)
    x, w, b = operands(2, 100, 300, torch.float16, "cpu", gen, True)
    norm_w, res = norm_operands(2, 300, torch.float16, "cpu", gen, True)
    variants = list(itertools.product([False, True], [None, res]))
    for silu_and_mul, residual in variants:
        out = fast.rms_norm_linear(x, norm_w, EPS, w, b, residual, silu_and_mul)
        assert isinstance(out, tuple) == (residual is not None)
    ops = {key[1]: name for key, name in fast._FEW_ROW_CHOICE.items() if key[1].startswith("norm_")}
    assert ops == dict.fromkeys(["norm_linear", "norm_linear+residual", "norm_gate_up", "norm_gate_up+residual"],
                                "fused_gemv")
    monkeypatch.setitem(fast.NORM_LINEAR_KERNELS, "fused_gemv", lambda *args, **kwargs: "fused")
    assert all(fast.rms_norm_linear(x, norm_w, EPS, w, b, r, s) == "fused" for s, r in variants)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("silu_and_mul", [False, True])
def test_gpu_fast_rms_norm_linear_every_kernel_matches_float64_and_replays(rows, residual, silu_and_mul):
    """Fast mode's norm + qkv projection and norm + gate_up projection + SiLU-and-mul at Qwen3-0.6B's shapes: the
    pair or, at <= 4 rows, the fused GEMV; the one timed fastest and each forced match float64, and a CUDA-graph
    replay gives the eager bits (the residual sum's too)."""
    from parity.kernels.triton import fast

    gen = torch.Generator().manual_seed(62)
    n, k = (6144, 1024) if silu_and_mul else (4096, 1024)
    x, w, _ = operands(rows, n, k, torch.bfloat16, "cuda", gen, False)
    norm_w, res = norm_operands(rows, k, torch.bfloat16, "cuda", gen, residual)
    ref = norm_linear_truth(x, norm_w, res, w, None, silu_and_mul)
    bound = TOL[torch.bfloat16] * (2 if silu_and_mul else 1)

    def call():
        return fast._outputs(fast.rms_norm_linear(x, norm_w, EPS, w, None, res, silu_and_mul))

    eager = call()
    assert rel_err(eager[0], ref) < bound
    op = ("norm_gate_up" if silu_and_mul else "norm_linear") + ("+residual" if residual else "")
    key = (rows, op, (n, k), w.dtype, w.device, False)
    assert (key in fast._FEW_ROW_CHOICE) == (rows <= tg.MAX_ROWS)
    if rows <= tg.MAX_ROWS:
        chosen = fast._FEW_ROW_CHOICE[key]
        for name in fast.NORM_LINEAR_KERNELS:
            fast._FEW_ROW_CHOICE[key] = name
            out = call()
            assert rel_err(out[0], ref) < bound, name
            assert all(torch.equal(o, e) for o, e in zip(out[1:], eager[1:])), name  # the residual sum
        fast._FEW_ROW_CHOICE[key] = chosen
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = call()
    graph.replay()
    assert all(torch.equal(r, e) for r, e in zip(replayed, eager, strict=True))


def test_few_row_matmuls_run_in_graphs_with_dependent_launch():
    """fast._graph_time times the few-row candidates under programmatic dependent launch because every decode graph
    that runs a few-row matmul launches with it: the engine's bound must cover FEW_ROWS."""
    from parity.engine.cuda_graphs import DEPENDENT_LAUNCH_MAX_BATCH
    from parity.kernels.triton import fast

    assert fast.FEW_ROWS <= DEPENDENT_LAUNCH_MAX_BATCH
