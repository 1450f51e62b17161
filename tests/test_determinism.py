"""Deterministic (batch-invariant) mode on the torch path: a request's tokens and logprobs do not
depend on the batch it ran in, on chunked prefill, prefix caching or preemption; and the trainer-side
parity forward reproduces the engine's logprobs bit for bit, in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from parity.engine.engine import Engine
from parity.engine.sampling_params import SamplingParams
from parity.kernels import invariant, reference
from parity.kernels.metadata import AttentionMetadata
from parity.precision.metrics import mismatch_metrics
from parity.precision.policy import PrecisionPolicy
from parity.trainer.parity_model import load_parity_model, parity_model_from_engine, token_logprobs

PROMPT_LENS = (5, 23, 41, 9, 30, 3)
SAMPLING = [
    SamplingParams(temperature=0.8, max_tokens=12, seed=7, ignore_eos=True, raw_logprobs=True),
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, raw_logprobs=True),
    SamplingParams(temperature=1.3, top_k=20, max_tokens=12, seed=3, ignore_eos=True),
]


def _prompts(n: int = len(PROMPT_LENS)) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (length,), generator=g).tolist() for length in PROMPT_LENS[:n]]


def _engine(model_dir: str, dtype: str = "fp32", **kwargs) -> Engine:
    opts = dict(dtype=dtype, deterministic=True, max_model_len=256, kv_cache_memory=1 << 21)
    return Engine.from_pretrained(model_dir, **{**opts, **kwargs})


def _key(rollouts):
    return [(r.output_ids, r.output_logprobs, r.output_raw_logprobs) for r in rollouts]


def test_request_alone_equals_every_batch(llama_dir):
    prompts = _prompts()
    params = [SAMPLING[i % len(SAMPLING)] for i in range(len(prompts))]
    solo = _engine(llama_dir, max_num_batched_tokens=512)
    alone = [_key(solo.generate([p], [sp])) for p, sp in zip(prompts, params)]

    # Prefill in chunks of <= 16 tokens mixed with decodes, and a KV cache of 8 blocks of 16 tokens
    # (K and V, 2 layers, 2 KV heads of 16 floats), too small for the six requests: the scheduler
    # must preempt sequences and recompute them later.
    busy = _engine(llama_dir, max_num_batched_tokens=16, kv_cache_memory=8 * 2 * 2 * 16 * 2 * 16 * 4)
    assert busy.scheduler.block_manager.num_blocks == 8
    preemptions = 0
    for n in range(1, len(prompts) + 1):
        order = list(range(n))[::-1] if n % 2 else list(range(n))  # vary positions in the batch too
        out = busy.generate([prompts[i] for i in order], [params[i] for i in order])
        preemptions += sum(r.num_preemptions for r in out)
        for r in out:
            assert _key([r]) == alone[order[r.prompt_index]], f"prompt {order[r.prompt_index]} in a batch of {n}"
    assert preemptions > 0

    # Two samples per prompt share the prompt's KV blocks (prefix cache) and still match each prompt alone
    # on an engine where every sample computes its prompt itself.
    two = SamplingParams(n=2, temperature=0.9, max_tokens=8, seed=11, ignore_eos=True)
    shared = busy.generate(prompts[1:3], two)
    assert shared[1].num_cached_prompt_tokens > 0
    unshared = _engine(llama_dir, max_num_batched_tokens=512, enable_prefix_caching=False)
    for i, prompt in enumerate(prompts[1:3]):
        assert _key(shared[2 * i : 2 * i + 2]) == _key(unshared.generate([prompt], two))


def _assert_engine_equals_parity_forward(engine: Engine, trainer_model) -> None:
    prompts = _prompts(4)
    for params in SAMPLING:
        rollouts = engine.generate(prompts, params)
        scored = token_logprobs(trainer_model, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts],
                                temperature=params.temperature, top_k=params.top_k)
        for r, lp in zip(rollouts, scored):
            assert lp.dtype == torch.float32
            assert lp.tolist() == r.output_logprobs, f"params {params}"  # bit for bit
            if params.raw_logprobs:  # temperature 1, no filters = the raw logprobs
                raw = token_logprobs(trainer_model, [r.prompt_ids], [r.output_ids], temperature=1.0)[0]
                assert raw.tolist() == r.output_raw_logprobs


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_engine_logprobs_equal_parity_forward_bitwise(model_dirs, arch, dtype):
    engine = _engine(model_dirs[arch], dtype, max_num_batched_tokens=16)  # chunked prefill
    _assert_engine_equals_parity_forward(engine, parity_model_from_engine(engine))


def test_independently_loaded_parity_model_is_bitwise_too(model_dirs):
    qwen3_dir = model_dirs["qwen3"]
    engine = _engine(qwen3_dir, "bf16", max_num_batched_tokens=16)
    trainer = load_parity_model(qwen3_dir, PrecisionPolicy("bf16", deterministic=True), "cpu", max_positions=256)
    assert all(p.requires_grad for p in trainer.parameters())
    _assert_engine_equals_parity_forward(engine, trainer)


def test_parity_forward_gradients_match_fast_mode(llama_dir):
    """The deterministic kernels under autograd (their analytic backward) give the gradient of the same function
    as the fast path."""
    prompts, outputs = _prompts(3), [[7, 8, 9, 10], [11, 12], [13, 14, 15]]
    grads, values = [], []
    for deterministic in (True, False):
        model = load_parity_model(llama_dir, PrecisionPolicy("fp32", deterministic=deterministic), "cpu")
        lps = token_logprobs(model, prompts, outputs, temperature=0.7)
        torch.cat(lps).sum().backward()
        values.append(torch.cat(lps).detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-5)
    for name, g in grads[0].items():  # same gradient up to float32 summation order
        assert float((g - grads[1][name]).norm() / grads[1][name].norm()) < 1e-4, name


def test_fast_mode_close_to_parity_forward_and_hf(llama_dir):
    """Fast mode is not bitwise equal to the parity forward (different reduction orders) but close
    (fp32, tiny Llama: max |Δlogp| 1.4e-5 measured, on logprobs of magnitude ~1-10); in fp32 both
    are within 1e-4 of HF transformers."""
    from transformers import AutoModelForCausalLM

    prompts = _prompts(4)
    params = SamplingParams(temperature=0.8, max_tokens=12, seed=5, ignore_eos=True)
    rollouts = Engine.from_pretrained(llama_dir, dtype="fp32", max_model_len=256, kv_cache_memory=1 << 21,
                                      max_num_batched_tokens=16).generate(prompts, params)
    trainer = load_parity_model(llama_dir, PrecisionPolicy("fp32", deterministic=True), "cpu")
    with torch.no_grad():
        parity_lp = token_logprobs(trainer, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts], 0.8)
        hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
        hf_lp = []
        for r in rollouts:
            ids = torch.tensor([r.prompt_ids + r.output_ids])
            logits = hf(ids).logits[0, len(r.prompt_ids) - 1 : -1].float() / 0.8
            hf_lp.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r.output_ids)[:, None])[:, 0])
    fast = [torch.tensor(r.output_logprobs) for r in rollouts]
    fast_vs_parity = mismatch_metrics(fast, parity_lp)["mismatch/logp_abs_diff_max"]
    assert 0 < fast_vs_parity < 1e-4  # not bitwise: that needs deterministic mode
    assert mismatch_metrics(hf_lp, parity_lp)["mismatch/logp_abs_diff_max"] < 1e-4
    assert mismatch_metrics(hf_lp, fast)["mismatch/logp_abs_diff_max"] < 1e-4


# ----------------------------------------------------------------------------------- kernel level
def test_invariant_kernels_match_reference_and_are_row_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 64, generator=g)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    y = invariant.linear(x, w, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(5, 6), slice(3, 20)):
        assert torch.equal(invariant.linear(x[rows], w, b), y[rows])
    logits = 4 * torch.randn(7, 384, generator=g)
    lsm = invariant.log_softmax(logits)
    torch.testing.assert_close(lsm, torch.log_softmax(logits, -1), rtol=1e-6, atol=1e-5)
    assert torch.equal(invariant.log_softmax(logits[2:3]), lsm[2:3])
    h = torch.randn(9, 2 * 48, generator=g)
    assert torch.equal(invariant.silu_and_mul(h)[4:5], invariant.silu_and_mul(h[4:5]))
    torch.testing.assert_close(invariant.silu_and_mul(h), reference.silu_and_mul(h))


def test_invariant_attention_same_bits_from_paged_cache_and_packed_batch():
    """A sequence of 20 tokens attended (a) packed with another sequence and no cache, (b) through a
    paged cache with scattered blocks in chunks 7 + 12 + 1: the same bits for every token."""
    g = torch.Generator().manual_seed(0)
    num_heads, num_kv, head_dim, block = 4, 2, 16, 4
    lens = [20, 11]
    total = sum(lens)
    q = torch.randn(total, num_heads, head_dim, generator=g)
    k = torch.randn(total, num_kv, head_dim, generator=g)
    v = torch.randn(total, num_kv, head_dim, generator=g)
    packed_meta = AttentionMetadata.for_packed_sequences(lens, "cpu")
    packed = invariant.attention(q, k, v, None, packed_meta, 0.25)
    torch.testing.assert_close(packed, reference.varlen_attention(q, k, v, packed_meta, 0.25))

    k_cache = torch.full((16, block, num_kv, head_dim), float("nan"))  # unused slots must never be read
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.tensor([[9, 2, 14, 5, 0]], dtype=torch.int32)
    out = []
    for start, end in ((0, 7), (7, 19), (19, 20)):
        slots = [int(table[0, p // block]) * block + p % block for p in range(start, end)]
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32), seq_lens=torch.tensor([end], dtype=torch.int32),
            max_query_len=end - start, max_seq_len=end, query_start_loc_cpu=[0, end - start], seq_lens_cpu=[end],
            block_tables=table, slot_mapping=torch.tensor(slots),
        )
        reference.store_kvcache(k[start:end], v[start:end], k_cache, v_cache, meta.slot_mapping)
        out.append(invariant.attention(q[start:end], k[start:end], v[start:end], (k_cache, v_cache), meta, 0.25))
    assert torch.equal(torch.cat(out), packed[:20])


# ------------------------------------------------------------------------------- parity forward API
def test_token_logprobs_per_sequence_temperature_and_errors(llama_dir):
    model = load_parity_model(llama_dir, PrecisionPolicy("fp32", deterministic=True), "cpu", max_positions=64)
    prompts, outputs = [[5, 6, 7], [8, 9], [10]], [[11, 12], [], [13, 14, 15]]
    mixed = token_logprobs(model, prompts, outputs, temperature=[0.5, 1.0, 0.0])
    assert [t.numel() for t in mixed] == [2, 0, 3]
    assert mixed[0].tolist() == token_logprobs(model, prompts[:1], outputs[:1], temperature=0.5)[0].tolist()
    greedy = token_logprobs(model, prompts[2:], outputs[2:], temperature=1.0)[0]  # greedy scores at temperature 1
    assert mixed[2].tolist() == greedy.tolist()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        token_logprobs(model, [[5]], [[10**6]])
    with pytest.raises(ValueError, match="max_positions=64"):
        token_logprobs(model, [[5] * 60], [[6] * 10])
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        token_logprobs(model, [[5], [6]], [[7]])


def test_trained_parity_model_syncs_into_the_engine(llama_dir):
    """hf_named_weights: the fused parameters under HF names, so weight sync takes the trainer model."""
    engine = _engine(llama_dir)
    trainer = parity_model_from_engine(engine)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(0.01)
    engine.update_weights(trainer)
    for (name, ours), theirs in zip(engine.model.named_parameters(), trainer.parameters()):
        assert torch.equal(ours, theirs), name
