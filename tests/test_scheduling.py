"""Continuous batching under memory pressure, block accounting, prefix sharing, batch composition."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dir):
    return Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4)


def random_prompts(rng: random.Random, count: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    return [[rng.randrange(3, 300) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def outputs(rollouts):
    return [(r.output_ids, r.output_logprobs) for r in rollouts]


def test_request_alone_equals_request_in_mixed_batch(engine):
    rng = random.Random(0)
    prompts = random_prompts(rng, 6)
    together = engine.generate(prompts, GREEDY)
    for i, p in enumerate(prompts):
        (alone,) = engine.generate([p], GREEDY)
        assert alone.output_ids == together[i].output_ids
        torch.testing.assert_close(alone.output_logprobs, together[i].output_logprobs, atol=1e-4, rtol=0)


def test_preemption_under_tiny_kv_budget_gives_identical_outputs(llama_dir):
    rng = random.Random(1)
    prompts = random_prompts(rng, 8, 5, 30)
    params = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True, seed=7)
    roomy = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4)
    reference = roomy.generate(prompts, params)
    # 13 blocks of 4 tokens: one request (<= 50 tokens) fits, eight at once cannot.
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # K+V, layers, block, kv heads, head dim, fp32
    tight = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4, kv_cache_memory=13 * per_block)
    assert tight.scheduler.block_manager.num_blocks == 13
    squeezed = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [r.output_ids for r in squeezed] == [r.output_ids for r in reference]
    for a, b in zip(squeezed, reference):
        torch.testing.assert_close(a.output_logprobs, b.output_logprobs, atol=1e-4, rtol=0)
    assert tight.scheduler.block_manager.num_used_blocks == 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 24), min_size=1, max_size=6),
    max_tokens=st.integers(1, 8),
    num_blocks=st.integers(8, 20),
    budget=st.integers(3, 64),
    n=st.integers(1, 3),
)
def test_block_accounting_returns_to_all_free(llama_dir, lengths, max_tokens, num_blocks, budget, n):
    per_block = 2 * 2 * 4 * 2 * 16 * 4
    engine = Engine.from_pretrained(
        llama_dir, dtype="fp32", device="cpu", block_size=4,
        kv_cache_memory=num_blocks * per_block, max_num_batched_tokens=budget,
    )
    rng = random.Random(sum(lengths))
    prompts = [[rng.randrange(3, 300) for _ in range(k)] for k in lengths]
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=3)
    rollouts = engine.generate(prompts, params)
    assert len(rollouts) == n * len(prompts)
    assert all(len(r.output_ids) == max_tokens for r in rollouts)
    bm = engine.scheduler.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert all(c == 0 for c in bm.ref_counts)


def test_n_samples_share_prompt_blocks(llama_dir):
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4)
    prompt = list(range(10, 30))  # 20 tokens: 4 full blocks shareable (the last token's block is recomputed)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, ignore_eos=True, seed=1)
    engine.add_request(prompt, params)
    peak_used, shared_seen = 0, False
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        peak_used = max(peak_used, engine.scheduler.block_manager.num_used_blocks)
        if len(running) == 4:
            tables = [s.block_table for s in running]
            first_blocks = {t[0] for t in tables}
            shared_seen |= len(first_blocks) == 1 and engine.scheduler.block_manager.ref_counts[tables[0][0]] == 4
    assert shared_seen
    # Unshared, 4 samples x ceil(26/4)=7 blocks = 28; shared: 4 prompt blocks + 4 x 3 own blocks = 16.
    assert peak_used <= 16
    assert engine.scheduler.block_manager.num_used_blocks == 0


def test_prefix_cache_reused_across_requests(engine):
    prompt = list(range(40, 70))
    (first,) = engine.generate([prompt], GREEDY)
    (second,) = engine.generate([prompt], GREEDY)
    assert first.num_cached_prompt_tokens == 0
    assert second.num_cached_prompt_tokens == 28  # 7 full blocks of 4 before the last prompt token
    assert second.output_ids == first.output_ids
    torch.testing.assert_close(second.output_logprobs, first.output_logprobs, atol=1e-4, rtol=0)


def test_step_api_streams_finished_requests(engine):
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), request_id="short")
    engine.add_request([8, 9], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), request_id="long")
    finished = []
    while engine.has_unfinished():
        finished.extend(r.request_id for r in engine.step())
    assert finished == ["short", "long"]


@pytest.mark.parametrize("max_tokens", [8192, 300, 64, 40])
def test_prefill_graph_token_counts_cover_every_step_with_bounded_padding(max_tokens):
    """Every step size up to max_num_batched_tokens has a graph, padded by at most 64 tokens up to 512, then 25%."""
    from parity.engine.cuda_graphs import token_count_ladder

    sizes = token_count_ladder(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
    for n in range(1, max_tokens + 1):
        padded = next(t for t in sizes if t >= n)
        assert padded <= (n + 64 if n <= 512 else 1.25 * n), (n, padded)
