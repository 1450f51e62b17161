"""Async scheduling (parity.engine.step_pipeline): the look-ahead decode step changes no result. In deterministic
mode, an engine that queues the next decode step before booking the current one returns the same rollouts, bit
for bit, as one that runs step by step: tokens, logprobs, top logprobs, stop reasons and text, weight versions,
with samples stopping mid-stream (their look-ahead rows dropped), aborts and weight updates between steps."""

from __future__ import annotations

import pytest
import torch

from parity import Engine, SamplingParams
from parity.models.weights import hf_named_weights

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

PROMPTS = [list(range(10, 31)), [5, 6, 7, 8, 9, 10, 11], [40, 41, 42], list(range(60, 100))]


def make_engine(model_dir: str, device: str, async_scheduling: bool) -> Engine:
    """Deterministic; on CUDA in bf16 with decode CUDA graphs, where the look-ahead step replays a graph."""
    return Engine.from_pretrained(model_dir, device=device, dtype="fp32" if device == "cpu" else "bf16",
                                  deterministic=True, block_size=4, max_num_batched_tokens=32,
                                  async_scheduling=async_scheduling)


def as_tuple(r):
    return (r.prompt_index, r.sample_index, r.output_ids, r.output_logprobs, r.output_raw_logprobs, r.top_logprobs,
            r.finish_reason, r.stop_reason, r.text, r.output_weight_versions, r.num_cached_prompt_tokens)


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def engines(model_dirs, request):
    return tuple(make_engine(model_dirs["qwen3"], request.param, a) for a in (False, True))


def mixed_params(stop_ids: list[int]) -> list[SamplingParams]:
    """Greedy and sampled rows, top-k/top-p, logprobs, a stop token met mid-stream, a penalised request."""
    return [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=stop_ids, logprobs=2),
        SamplingParams(n=2, temperature=0.9, top_p=0.8, seed=3, max_tokens=15, raw_logprobs=True),
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=9, stop_token_ids=stop_ids),
        SamplingParams(temperature=0.7, seed=6, max_tokens=6, presence_penalty=0.5),
    ]


def test_generate_is_bitwise_the_same_with_the_look_ahead_step(engines):
    step_by_step, ahead = engines
    plain = [SamplingParams(temperature=0, max_tokens=12)] * len(PROMPTS)
    probe = step_by_step.generate(PROMPTS, plain)
    assert [as_tuple(r) for r in ahead.generate(PROMPTS, plain)] == list(map(as_tuple, probe))
    stop_ids = [probe[0].output_ids[4], probe[2].output_ids[2]]  # two samples stop early, mid-stream
    params = mixed_params(stop_ids)
    want = [as_tuple(r) for r in step_by_step.generate(PROMPTS, params)]
    used = ahead.pipeline.num_ahead_used
    got = [as_tuple(r) for r in ahead.generate(PROMPTS, params)]
    assert got == want
    assert any(r[6] == "stop" for r in got) and any(r[6] == "length" for r in got)
    assert ahead.pipeline.num_ahead_used > used  # the look-ahead step ran and was taken
    assert step_by_step.pipeline.num_ahead_used == 0
    assert ahead.kv_cache_usage() == step_by_step.kv_cache_usage()


def drive(engine: Engine, update: dict[str, torch.Tensor]) -> list[tuple]:
    """add_request/step with an abort, a "keep" and a "recompute" weight update, and a weight written in place
    outside update_weights, between steps."""
    params = SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=14, ignore_eos=True, logprobs=0)
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, params, request_id=f"r{i}")
    out, steps = [], 0
    while engine.has_unfinished():
        out += engine.step()
        steps += 1
        if steps == 6:
            out += engine.abort("r1", sample_index=0)
        if steps == 8:
            engine.update_weights(update, in_flight="keep")
        if steps == 9:
            with torch.no_grad():
                engine.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        if steps == 11:
            engine.update_weights(update, in_flight="recompute")
    return sorted(map(as_tuple, out), key=lambda r: (r[0], r[1]))


def test_steps_aborts_and_weight_updates_give_the_same_rollouts(engines):
    step_by_step, ahead = engines
    g = torch.Generator().manual_seed(2)
    update = {k: v + (0.02 * torch.randn(v.shape, generator=g)).to(v) * v.float().std().to(v)
              for k, v in hf_named_weights(step_by_step.model)}
    discarded = ahead.pipeline.num_ahead_discarded
    want = drive(step_by_step, update)
    got = drive(ahead, update)
    assert got == want
    assert {r[6] for r in got} == {"abort", "length"}
    assert {v for r in got for v in r[9]} >= {0, 1, 2}  # tokens sampled under every version
    assert ahead.pipeline.num_ahead_discarded > discarded  # the updates threw look-ahead steps away
    assert ahead.kv_cache_usage() == step_by_step.kv_cache_usage()


def test_more_requests_than_seats_admission_waits_a_step_and_nothing_is_thrown_away(model_dirs):
    """Twice as many samples as seats, some stopping mid-stream: the same rollouts as step by step, look-ahead
    steps while requests wait for seats, and none of them discarded (a freed seat is filled a step later)."""
    make = lambda a: Engine.from_pretrained(model_dirs["qwen3"], device="cpu", dtype="fp32", deterministic=True,
                                            block_size=4, max_num_seqs=3, async_scheduling=a)
    step_by_step, ahead = make(False), make(True)
    prompts = [[7 + i, 20 + 3 * i, 41, 5 + i] for i in range(6)]
    probe = step_by_step.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    stop_ids = sorted({r.output_ids[3] for r in probe[:3]})
    params = SamplingParams(temperature=0.8, seed=9, max_tokens=10, stop_token_ids=stop_ids, logprobs=1)
    want = [as_tuple(r) for r in step_by_step.generate(prompts, params)]
    got = [as_tuple(r) for r in ahead.generate(prompts, params)]
    assert got == want
    assert {r[6] for r in got} == {"stop", "length"}
    assert ahead.pipeline.num_ahead_used > 0 and ahead.pipeline.num_ahead_discarded == 0
