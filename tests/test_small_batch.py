"""Fast mode's fused small-batch projections (`parity.kernels.triton.small_batch`, `EngineConfig.fused_small_batch`):
each kernel against its unfused torch reference, the residual sum exact, and the engine generating the same greedy
tokens with the option on as off.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest before any kernel is
defined) at small sizes; `-m gpu` checks the compiled kernels at Qwen3-0.6B's layer shapes and the engine with CUDA
graphs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from parity import Engine, EngineConfig, SamplingParams
from parity.kernels import dispatch
from parity.kernels.dispatch import Kernels
from parity.kernels.metadata import AttentionMetadata
from parity.kernels.triton import small_batch as sb
from parity.models.config import ModelConfig
from parity.models.decoder import DecoderModel
from parity.precision.policy import PrecisionPolicy
from parity.testing.factory import TinyModelSpec, write_tiny_model

ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter runs without a GPU")
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DEVICES = [pytest.param("cpu", marks=ON_CPU), pytest.param("cuda", marks=ON_GPU)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error against float64: the interpreter rounds float32 -> bf16 by truncation, which about doubles bf16's.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
INTERPRETED_TOL = {**TOL, torch.bfloat16: 2e-2}
# (rows, K, N): K a multiple of no tile depth, N of no tile width; on the GPU Qwen3-0.6B's qkv, gate/up and down.
CPU_SHAPES = [(1, 200, 70), (5, 200, 70), (16, 200, 70)]
GPU_SHAPES = [(m, k, n) for m in (1, 7, 16) for k, n in ((1024, 4096), (1024, 6144), (3072, 1024), (200, 70))]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm()).item()


def randn(*shape, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)


def shapes(device):
    return CPU_SHAPES if device == "cpu" else GPU_SHAPES


def tol(dtype, device) -> float:
    return (INTERPRETED_TOL if device == "cpu" else TOL)[dtype]


def norm_operands(m, k, n, dtype, device):
    """x, residual, norm weight, projection weight, bias, scaled like a decoder layer's."""
    return (randn(m, k, dtype=dtype, device=device, seed=0), randn(m, k, dtype=dtype, device=device, seed=1),
            (1 + randn(k, dtype=torch.float32, device=device, seed=2, scale=0.3)).to(dtype),
            randn(n, k, dtype=dtype, device=device, seed=3, scale=k**-0.5), randn(n, dtype=dtype, device=device, seed=4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_linear_matches_the_unfused_reference(device, dtype):
    for m, k, n in shapes(device):
        x, res, norm_w, w, b = norm_operands(m, k, n, dtype, device)
        for residual, bias in ((res, None), (res, b), (None, None)):
            y, summed = sb.norm_linear(x, residual, norm_w, 1e-6, w, bias)
            ref, ref_sum = sb.norm_linear_reference(x, residual, norm_w, 1e-6, w, bias)
            truth, _ = sb.norm_linear_reference(*(t.double() if t is not None else None for t in (x, residual, norm_w)),
                                                1e-6, w.double(), bias.double() if bias is not None else None)
            assert y.dtype == dtype and y.shape == (m, n)
            assert rel_err(y, truth) < tol(dtype, device), (m, k, n, residual is None, bias is None)
            assert rel_err(y, ref) < tol(dtype, device)
            if residual is None:
                assert summed is x  # the first layer's residual is its input, as the unfused layer keeps it
            elif device == "cuda" or dtype != torch.bfloat16:  # the interpreter truncates to bf16
                assert torch.equal(summed, ref_sum)  # one rounding of the float32 sum, like torch's add


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_linear_matches_the_unfused_reference(device, dtype):
    for m, k, n in shapes(device):
        gate_up = randn(m, 2 * k, dtype=dtype, device=device, seed=5, scale=2.0)
        w = randn(n, k, dtype=dtype, device=device, seed=6, scale=k**-0.5)
        b = randn(n, dtype=dtype, device=device, seed=7)
        for bias in (None, b):
            y = sb.silu_mul_linear(gate_up, w, bias)
            truth = sb.silu_mul_linear_reference(gate_up.double(), w.double(), bias.double() if bias is not None else None)
            assert y.dtype == dtype and y.shape == (m, n)
            assert rel_err(y, truth) < tol(dtype, device), (m, k, n, bias is None)
            assert rel_err(y, sb.silu_mul_linear_reference(gate_up, w, bias)) < tol(dtype, device)


@ON_CPU
def test_rows_do_not_see_each_other():
    """Padding rows of a CUDA-graph batch and the masked tile rows past M leave the real rows' results alone."""
    x, res, norm_w, w, _ = norm_operands(16, 200, 70, torch.float32, "cpu")
    y, summed = sb.norm_linear(x, res, norm_w, 1e-6, w)
    y3, summed3 = sb.norm_linear(x[:3], res[:3], norm_w, 1e-6, w)
    assert torch.equal(y3, y[:3]) and torch.equal(summed3, summed[:3])


@ON_CPU
@pytest.mark.parametrize("call, message", [
    (lambda x, w: sb.norm_linear(x, None, torch.ones(8, dtype=torch.float16), 1e-6, w),
     r"norm_linear: every operand must have one dtype, got x torch.float32, norm_weight torch.float16"),
    (lambda x, w: sb.norm_linear(x, None, torch.ones(9), 1e-6, w),
     r"norm_linear: x has 8 features but the norm weight is \(9,\)"),
    (lambda x, w: sb.norm_linear(x[None], None, torch.ones(8), 1e-6, w),
     r"norm_linear: x must be \[rows, features\], got shape \(1, 3, 8\)"),
    (lambda x, w: sb.norm_linear(x.t().contiguous().t(), None, torch.ones(8), 1e-6, w),
     r"norm_linear: x must be contiguous in the last dimension"),
    (lambda x, w: sb.silu_mul_linear(x, w),
     r"silu_mul_linear: gate_up has 8 columns, the weight \(5, 8\) takes 8 \(gate_up must hold gate then up, 16"),
])
def test_bad_operands_are_refused_naming_them(call, message):
    x, w = torch.ones(3, 8), torch.ones(5, 8)
    with pytest.raises(ValueError, match=message):
        call(x, w)


def test_fusion_applies_to_small_fast_mode_forwards_only(monkeypatch):
    monkeypatch.setattr(dispatch, "device_kind", lambda x: "cuda")
    x = torch.ones(16, 8)
    with torch.no_grad():
        assert Kernels(fused_small_batch=True).fuses_small_batch(x)
        assert not Kernels(fused_small_batch=True).fuses_small_batch(torch.ones(17, 8))  # past the 16-row tiles
        assert not Kernels(fused_small_batch=True, deterministic=True).fuses_small_batch(x)
        assert not Kernels().fuses_small_batch(x)
    assert not Kernels(fused_small_batch=True).fuses_small_batch(x)  # autograd: the fused kernels have no backward
    monkeypatch.undo()
    with torch.no_grad():
        assert not Kernels(fused_small_batch=True).fuses_small_batch(x)  # CPU tensors: no Triton


@pytest.mark.parametrize("kwargs, message", [
    (dict(fused_small_batch=True, deterministic=True), r"fused_small_batch=True needs fast mode, but deterministic=True"),
    (dict(fused_small_batch=1), r"fused_small_batch must be True or False, got 1 \(int\)"),
])
def test_engine_config_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def count_fused_calls(monkeypatch) -> dict[str, int]:
    """Calls of the two fused kernels from here on (the dispatch looks them up on the module at each call)."""
    calls = {"norm_linear": 0, "silu_mul_linear": 0}

    def counting(name: str):
        kernel = getattr(sb, name)

        def counted(*args):
            calls[name] += 1
            return kernel(*args)
        return counted

    for name in calls:
        monkeypatch.setattr(sb, name, counting(name))
    return calls


class StandInRowParallel(torch.nn.Module):
    """A down projection that is not a plain Linear, as tensor parallelism's RowParallelLinear (whose all-reduce
    must follow the matmul): counts its calls."""

    def __init__(self, linear: torch.nn.Module):
        super().__init__()
        self.linear = linear
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear(x)


def random_model(hf_config) -> DecoderModel:
    """A fast-mode float32 DecoderModel of `hf_config` with random weights (norm weights near 1)."""
    model = DecoderModel(ModelConfig.from_hf_config(hf_config), PrecisionPolicy("fp32", deterministic=False), "cpu", 64)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.data.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
    return model


@ON_CPU
@pytest.mark.parametrize("layout", ["dense, row-parallel down projection", "mixture of experts"])
def test_layers_the_fusion_cannot_take_keep_their_unfused_kernels(monkeypatch, layout):
    """A down projection that is not a plain Linear (tensor parallelism's) keeps SiLU-and-mul and itself apart; a
    sparse MoE block gets the post-attention norm's output as it is. Hidden states equal the unfused forward's to
    float32 rounding."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    shapes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)
    if layout == "mixture of experts":
        hf = Qwen3MoeConfig(**shapes, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                            mlp_only_layers=[1], architectures=["Qwen3MoeForCausalLM"])
    else:
        hf = Qwen3Config(**shapes, architectures=["Qwen3ForCausalLM"])
    model = random_model(hf)
    stand_ins = [StandInRowParallel(layer.mlp.down_proj) for layer in model.layers if layout.startswith("dense")]
    for layer, stand_in in zip(model.layers, stand_ins):
        layer.mlp.down_proj = stand_in
    monkeypatch.setattr(dispatch, "device_kind", lambda x: "cuda")
    calls = count_fused_calls(monkeypatch)
    ids, positions = torch.tensor([5, 9, 2, 7, 3]), torch.arange(5)
    meta = AttentionMetadata.for_packed_sequences([5], "cpu")
    with torch.no_grad():
        unfused = model(ids, positions, meta)
        model.kernels.fused_small_batch = True
        fused = model(ids, positions, meta)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    if stand_ins:  # each layer: both norms fused into their projections, SiLU-and-mul left to the stand-in
        assert calls == {"norm_linear": 4, "silu_mul_linear": 0} and all(s.calls == 2 for s in stand_ins)
    else:  # layer 0 sparse (input norm fused only), layer 1 dense (all three)
        assert calls == {"norm_linear": 3, "silu_mul_linear": 1}


def generate_on_and_off(path, prompts, params, **kwargs):
    """(option off, option on) rollouts of the same prompts on two engines of the same checkpoint."""
    return [Engine.from_pretrained(path, fused_small_batch=fused, **kwargs).generate(prompts, params)
            for fused in (False, True)]


def assert_same_greedy_tokens(off, on, first: int, logprob_tol: float) -> None:
    for a, b in zip(off, on):
        assert a.output_ids[:first] == b.output_ids[:first]
        assert max(abs(x - y) for x, y in zip(a.output_logprobs[:first], b.output_logprobs[:first])) < logprob_tol


@ON_CPU
def test_engine_with_fused_small_batch_in_the_interpreter(tmp_path, monkeypatch):
    """Fast mode on the Triton kernels (interpreted, on CPU tensors), option on vs off: the same greedy tokens and
    logprobs to float32 rounding. The decode steps (2 tokens) fuse, the 29-token prefill does not. Two layers: the
    first has no residual yet, the second adds one."""
    spec = TinyModelSpec(architecture="qwen3", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1, vocab_size=300)
    path = write_tiny_model(tmp_path / "m", spec)
    monkeypatch.setattr(dispatch, "device_kind", lambda x: "cuda")
    calls = count_fused_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 24)]
    off, on = generate_on_and_off(path, prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                                  dtype="fp32", max_model_len=128, kv_cache_memory=1 << 20)
    assert_same_greedy_tokens(off, on, 4, 1e-4)
    assert calls["silu_mul_linear"] > 0 and calls["norm_linear"] == 2 * calls["silu_mul_linear"]  # per layer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, first, logprob_tol", [("fp32", 16, 1e-3), ("bf16", 8, 0.25), ("fp16", 8, 0.05)])
def test_engine_with_fused_small_batch_on_cuda(tmp_path, monkeypatch, dtype, first, logprob_tol):
    """Qwen3-0.6B's layer shapes (two layers, the factory's wide init), decode steps of 6 sequences in CUDA graphs,
    option on vs off: the same leading greedy tokens, logprobs within rounding (tolerances as tests/test_gpu_engine.py
    allows graphs against eager kernels)."""
    spec = TinyModelSpec(architecture="qwen3", hidden_size=1024, intermediate_size=3072, num_layers=2, num_heads=16,
                         num_kv_heads=8, head_dim=128)
    path = write_tiny_model(tmp_path / "m", spec)
    calls = count_fused_calls(monkeypatch)
    prompts = [[5 + i, 7, 9, 11 + i] * (2 + 9 * i) for i in range(6)]  # 8 to 188 tokens
    off, on = generate_on_and_off(path, prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                                  device="cuda", dtype=dtype, max_num_seqs=8, max_model_len=512)
    assert calls["norm_linear"] > 0 and calls["silu_mul_linear"] > 0  # captured into the decode graphs
    assert_same_greedy_tokens(off, on, first, logprob_tol)
