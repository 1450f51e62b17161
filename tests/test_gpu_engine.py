"""End-to-end on CUDA (run with `pytest -m gpu` on the device): the Triton + CUDA-graph engine against
the CPU float32 reference engine, graphs against eager, and the fp32-output LM head."""

from __future__ import annotations

import re

import pytest
import torch

from parity import Engine, SamplingParams
from parity.testing.factory import TinyModelSpec, write_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SPECS = {
    "llama": TinyModelSpec(architecture="llama"),
    "qwen2": TinyModelSpec(architecture="qwen2"),
    "qwen3-d128": TinyModelSpec(architecture="qwen3", hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=128),
}
PROMPTS = [[5 + i, 7, 9, 11 + i] * (2 + 9 * i) for i in range(6)]  # 8 to 188 tokens


@pytest.fixture(scope="module")
def gpu_model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gpu_models")
    return {name: str(write_tiny_model(root / name, spec)) for name, spec in SPECS.items()}


def greedy(n: int = 16) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def cpu_reference(path: str):
    return Engine.from_pretrained(path, device="cpu", dtype="fp32").generate(PROMPTS, greedy())


def agreement(ref, out, first: int) -> tuple[list[int], list[float]]:
    """Per prompt: how many leading tokens (up to `first`) equal the reference's, and the mean |Δlogprob|
    over those tokens (later logprobs condition on different histories, so they are not comparable)."""
    lengths, errors = [], []
    for r, o in zip(ref, out):
        n = next((i for i, (a, b) in enumerate(zip(r.output_ids[:first], o.output_ids[:first])) if a != b), first)
        lengths.append(n)
        errors.append(sum(abs(a - b) for a, b in zip(r.output_logprobs[:n], o.output_logprobs[:n])) / max(n, 1))
    return lengths, errors


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype,first,logprob_tol", [("fp32", 16, 1e-3), ("fp16", 4, 0.05)])
def test_gpu_engine_matches_cpu_fp32_reference(gpu_model_dirs, name, dtype, first, logprob_tol):
    ref = cpu_reference(gpu_model_dirs[name])
    eng = Engine.from_pretrained(gpu_model_dirs[name], device="cuda", dtype=dtype, max_num_seqs=8, max_model_len=512)
    assert eng.runner.graphs is not None  # decode steps replay graphs
    out = eng.generate(PROMPTS, greedy())
    for r, o in zip(ref, out):
        assert o.output_ids[:first] == r.output_ids[:first]
        diffs = [abs(a - b) for a, b in zip(r.output_logprobs[:first], o.output_logprobs[:first])]
        assert max(diffs) < logprob_tol, diffs


@pytest.mark.parametrize("name", list(SPECS))
def test_gpu_bf16_stays_within_torch_bf16_error(gpu_model_dirs, name):
    """bf16 (8-bit mantissa) greedy decoding drifts from fp32 even with torch's own CPU kernels (a tiny
    model with a wide init has logits in the tens). The Triton + graph path must stay in that error
    class: as many leading tokens agreeing with the fp32 reference (within a factor 2), and a mean
    |Δlogp| over the agreeing tokens at most twice the CPU bf16 one (+0.01)."""
    path = gpu_model_dirs[name]
    ref = cpu_reference(path)
    cpu = Engine.from_pretrained(path, device="cpu", dtype="bf16").generate(PROMPTS, greedy())
    gpu = Engine.from_pretrained(path, device="cuda", dtype="bf16", max_num_seqs=8, max_model_len=512).generate(
        PROMPTS, greedy())
    cpu_len, cpu_err = agreement(ref, cpu, 8)
    gpu_len, gpu_err = agreement(ref, gpu, 8)
    assert all(n >= 1 for n in gpu_len) and sum(gpu_len) >= sum(cpu_len) / 2, (gpu_len, cpu_len)
    assert sum(gpu_err) / len(gpu_err) <= 2 * sum(cpu_err) / len(cpu_err) + 0.01, (gpu_err, cpu_err)


@pytest.mark.parametrize("dtype,logprob_tol", [("bf16", 0.25), ("fp16", 0.05)])
def test_cuda_graphs_match_eager(gpu_model_dirs, dtype, logprob_tol):
    """Graph replay (padded batch sizes, split-KV sized by max_model_len) against eager kernels; then
    after invalidation the graphs are re-captured and give the same results again."""
    path = gpu_model_dirs["qwen3-d128"]
    params = [greedy(24), SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True)] * 3
    eager = Engine.from_pretrained(path, device="cuda", dtype=dtype, enforce_eager=True, max_num_seqs=8, max_model_len=512)
    assert eager.runner.graphs is None
    ref = eager.generate(PROMPTS, params)
    # no prefix caching: the second run then schedules exactly like the first, so replays must match bit for bit
    eng = Engine.from_pretrained(path, device="cuda", dtype=dtype, max_num_seqs=8, max_model_len=512,
                                 enable_prefix_caching=False)
    first = eng.generate(PROMPTS, params)
    eng.runner.invalidate_cuda_graphs()
    again = eng.generate(PROMPTS, params)
    for r, a, b in zip(ref, first, again):
        assert a.output_ids == b.output_ids and a.output_logprobs == b.output_logprobs  # replays are deterministic
        # graphs and eager differ in batch shapes and split-KV counts, so only rounding may differ: bf16 rounding
        # moves these tiny models' logprobs (logits in the tens) by up to ~0.1, fp16's about 8x less
        assert a.output_ids[:8] == r.output_ids[:8]
        assert max(abs(x - y) for x, y in zip(a.output_logprobs[:8], r.output_logprobs[:8])) < logprob_tol


def test_lm_head_fp32_output_without_weight_copy():
    from parity.kernels.dispatch import Kernels

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 1024, generator=gen).to("cuda", torch.bfloat16)
    w = torch.randn(5000, 1024, generator=gen).to("cuda", torch.bfloat16)
    out = Kernels().linear_fp32(x, w)
    ref = x.double() @ w.double().t()
    assert out.dtype == torch.float32
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5  # fp32 accumulation


def test_overflow_inside_a_cuda_graph_decode_step_raises_naming_the_layer(gpu_model_dirs):
    """The fp16 inf/nan check also covers graph replays: the prefill (eager) is finite, then layer 1's MLP
    output projection is scaled in place (graphs read the same memory) and the next decode step overflows."""
    from parity.precision.policy import NonFiniteActivationError

    engine = Engine.from_pretrained(gpu_model_dirs["llama"], device="cuda", dtype="fp16", max_num_seqs=4, max_model_len=128)
    assert engine.runner.graphs is not None
    engine.add_request([5, 6, 7, 8], greedy(4))
    engine.step()  # prefill, eager
    with torch.no_grad():
        engine.model.layers[1].mlp.down_proj.weight.mul_(1e4)
    failed = engine.step()  # decode: a graph replay; the failing request fails alone
    assert [r.finish_reason for r in failed] == ["error"]
    assert NonFiniteActivationError.__name__ in failed[0].error
    assert re.search(r"layer 1 \(mlp\) produced inf/nan in fp16", failed[0].error)
    assert not engine.has_unfinished() and engine.kv_cache_usage()["used_blocks"] == 0


@pytest.mark.parametrize("deterministic", [False, True])
def test_prefill_graphs_match_eager_with_chunks_and_decode_rows_beside_them(gpu_model_dirs, deterministic):
    """Steps that prefill replay graphs padded to a token count on the ladder (every 64 up to 256, then 300 here), chunks of
    several prompts with decode rows beside them. Deterministic mode gives the eager steps' bits exactly (padding
    tokens and sequences are more batch, and its kernels are batch-invariant); fast mode only rounds differently."""
    path = gpu_model_dirs["qwen3-d128"]
    params = [greedy(24), SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True)] * 3
    kw = dict(device="cuda", dtype="bf16", max_num_seqs=8, max_model_len=512, max_num_batched_tokens=300,
              enable_prefix_caching=False, deterministic=deterministic)
    eager = Engine.from_pretrained(path, enforce_eager=True, **kw)
    assert eager.runner.prefill_graphs is None
    ref = eager.generate(PROMPTS, params)
    eng = Engine.from_pretrained(path, **kw)
    assert eng.runner.prefill_graphs.sizes == [64, 128, 192, 256, 300]
    out = eng.generate(PROMPTS, params)
    assert eng.runner.prefill_graphs.replays >= 2  # 588 prompt tokens in chunks of at most 300
    for r, o in zip(ref, out):
        if deterministic:
            assert o.output_ids == r.output_ids and o.output_logprobs == r.output_logprobs
        else:
            assert o.output_ids[:8] == r.output_ids[:8]
            assert max(abs(x - y) for x, y in zip(o.output_logprobs[:8], r.output_logprobs[:8])) < 0.25


def test_overflow_inside_a_prefill_graph_raises_naming_the_layer(gpu_model_dirs):
    """The inf/nan flag of a prefill graph: layer 1's MLP output projection scaled before the first step, whose
    prefill is a replay; the request fails alone, naming the layer (the eager re-run), and the next one runs."""
    from parity.precision.policy import NonFiniteActivationError

    engine = Engine.from_pretrained(gpu_model_dirs["llama"], device="cuda", dtype="fp16", max_num_seqs=4,
                                    max_model_len=128, max_num_batched_tokens=64)
    weight = engine.model.layers[1].mlp.down_proj.weight
    kept = weight.clone()
    with torch.no_grad():
        weight.mul_(1e4)
    engine.add_request([5, 6, 7, 8] * 4, greedy(4))
    failed = engine.step()
    assert engine.runner.prefill_graphs.replays == 1
    assert [r.finish_reason for r in failed] == ["error"]
    assert NonFiniteActivationError.__name__ in failed[0].error
    assert re.search(r"layer 1 \(mlp\) produced inf/nan in fp16", failed[0].error)
    assert not engine.has_unfinished() and engine.kv_cache_usage()["used_blocks"] == 0
    with torch.no_grad():
        weight.copy_(kept)
    assert len(engine.generate([[5, 6, 7, 8] * 4], greedy(4))[0].output_ids) == 4
