"""Sampling filters against a plain per-row reference, seeded reproducibility, and the sampled distribution."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from parity import Engine, SamplingParams
from parity.engine.sampler import process_logits, sample


def reference_keep_set(logits: list[float], p: SamplingParams) -> set[int]:
    """Which token ids survive temperature -> min-p -> top-k -> top-p, written out plainly."""
    t = p.temperature if p.temperature > 0 else 1.0
    scaled = [x / t for x in logits]
    m = max(scaled)
    probs = [math.exp(x - m) for x in scaled]
    z = sum(probs)
    probs = [q / z for q in probs]
    keep = set(range(len(logits)))
    if p.min_p > 0:
        keep = {i for i in keep if probs[i] >= p.min_p * max(probs)}
    order = sorted(keep, key=lambda i: -scaled[i])
    if p.top_k > 0:
        order = order[: p.top_k]
    if p.top_p < 1:
        mass = sum(probs[i] for i in order)
        kept, before = [], 0.0
        for i in order:
            if before >= p.top_p and kept:
                break
            kept.append(i)
            before += probs[i] / mass
        order = kept
    return set(order)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.5, top_k=20, top_p=0.8, min_p=0.01),
        SamplingParams(temperature=0, top_k=3),
    ],
)
def test_filters_match_plain_reference(params):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 64, generator=gen) * 3
    processed = process_logits(logits, [params] * 6)
    for row in range(6):
        kept = set(torch.nonzero(torch.isfinite(processed[row])).flatten().tolist())
        assert kept == reference_keep_set(logits[row].tolist(), params)
        t = params.temperature or 1.0
        torch.testing.assert_close(processed[row][list(kept)], logits[row][list(kept)] / t)


def test_returned_logprobs_are_renormalised_over_the_kept_set():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 2
    params = [SamplingParams(temperature=0.9, top_k=7, seed=s) for s in range(4)]
    out = sample(logits, params, seeds=[0, 1, 2, 3], steps=[0] * 4)
    for row, (tok, lp, raw) in enumerate(zip(out.token_ids, out.logprobs, out.raw_logprobs)):
        top = torch.topk(logits[row], 7)
        assert tok in top.indices.tolist()
        expect = torch.log_softmax(top.values / 0.9, dim=0)[top.indices.tolist().index(tok)]
        assert lp == pytest.approx(expect.item(), abs=1e-5)
        assert raw == pytest.approx(torch.log_softmax(logits[row], 0)[tok].item(), abs=1e-5)


def test_temperature_sampling_matches_softmax_frequencies():
    """Chi-square goodness of fit of 20k draws (one per seed) against softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 20000
    params = [SamplingParams(temperature=0.8)] * draws
    out = sample(logits.expand(draws, -1).contiguous(), params, seeds=list(range(draws)), steps=[3] * draws)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=6).double()
    expected = torch.softmax(logits.double() / 0.8, dim=0) * draws
    _, pvalue = stats.chisquare(counts.numpy(), expected.numpy())
    assert pvalue > 1e-3, (counts, expected)


def test_draws_vary_with_step_and_seed_but_repeat_exactly():
    logits = torch.zeros(1, 1000)
    p = [SamplingParams(temperature=1.0)]
    a = sample(logits, p, seeds=[5], steps=[0]).token_ids
    assert sample(logits, p, seeds=[5], steps=[0]).token_ids == a
    others = {sample(logits, p, seeds=[5], steps=[s]).token_ids[0] for s in range(1, 20)}
    others |= {sample(logits, p, seeds=[s], steps=[0]).token_ids[0] for s in range(6, 26)}
    assert len(others) > 30


def test_seeded_generation_reproducible_and_batch_independent(llama_dir):
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu")
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=10, seed=42, ignore_eos=True)
    first = engine.generate(["Hello world"], params)
    again = engine.generate(["Hello world", "The quick brown fox"], params)[:3]
    assert [r.output_ids for r in first] == [r.output_ids for r in again]
    assert len({tuple(r.output_ids) for r in first}) > 1  # the n samples differ from each other
    other_seed = engine.generate(["Hello world"], SamplingParams(**{**params.__dict__, "seed": 43}))
    assert [r.output_ids for r in other_seed] != [r.output_ids for r in first]


def test_stop_tokens_and_eos(llama_dir):
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu")
    (free,) = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    stop_at = free.output_ids[3]
    (stopped,) = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at]))
    first = free.output_ids.index(stop_at)
    assert stopped.output_ids == free.output_ids[: first + 1]  # the stop token is kept
    assert stopped.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.output_ids) == 8


@pytest.mark.parametrize("deterministic", [False, True])
def test_greedy_batch_takes_the_one_pass_pick_with_the_same_results(deterministic):
    """A batch that is all greedy on unchanged logits samples through `Kernels.argmax_logprob`, with the results of
    the full log-softmax path (tokens, their logprobs, raw logprobs); a batch with a sampled row, a filter or top
    logprobs keeps the full path."""
    from parity.engine.sampler import sample_async
    from parity.kernels.dispatch import Kernels

    kernels = Kernels(deterministic=deterministic)
    logits = 4 * torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    logits[2, 17] = logits[2, 40] = logits[2].max() + 1  # a tie: the first maximum
    calls = []

    def pick(x):
        calls.append(x.shape[0])
        return kernels.argmax_logprob(x)

    greedy = [SamplingParams(temperature=0)] * 5
    args = (logits, greedy, [0] * 5, [0] * 5, kernels.log_softmax)
    picked = sample_async(*args, argmax_logprob=pick).result()
    full = sample_async(*args).result()
    assert calls == [5] and picked == full and picked.token_ids[2] == 17
    for other in (SamplingParams(temperature=0.7, seed=1), SamplingParams(temperature=0, top_k=3),
                  SamplingParams(temperature=0, logprobs=2)):
        params = greedy[:4] + [other]
        sample_async(logits, params, [0] * 5, [0] * 5, kernels.log_softmax, argmax_logprob=pick).result()
    assert calls == [5]


def test_mixed_and_all_sampled_batches_pick_argmax_and_gumbel_rows():
    """Greedy rows take the argmax, sampled rows the reference Gumbel-max of their tempered log-softmax, whether
    the batch mixes the two or samples every row (which skips the argmax pass)."""
    from parity.engine.sampler import sample_async
    from parity.kernels import reference

    logits = torch.randn(4, 200, generator=torch.Generator().manual_seed(5))  # flat: a draw is seldom the argmax
    seeds, steps = [11, 12, 13, 14], [3, 4, 5, 6]
    hot = SamplingParams(temperature=0.6)
    gumbel = reference.gumbel_argmax(torch.log_softmax(logits / 0.6, -1), torch.tensor(seeds), torch.tensor(steps))
    mixed = sample_async(logits, [SamplingParams(temperature=0), hot, SamplingParams(temperature=0), hot],
                         seeds, steps).result()
    assert mixed.token_ids == [int(logits[0].argmax()), int(gumbel[1]), int(logits[2].argmax()), int(gumbel[3])]
    assert sample_async(logits, [hot] * 4, seeds, steps).result().token_ids == gumbel.tolist()
