"""Random sequences of good and bad requests, weight updates and sleeps: after every action the engine either
succeeded or raised a clear error, is idle with every KV block free, and a fixed probe gives the outputs of
the weights it holds (the first outputs ever seen for them), so nothing a refused action did is observable."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from parity import Engine, PromptTooLongError, SamplingParams
from parity.engine.sleep import EngineAsleepError
from parity.models.weights import WeightError, hf_named_weights
from parity.precision.policy import NonFiniteActivationError

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

MAX_LEN = 48
PROBE = ([[5, 6, 7, 8], [9, 10, 11]],
         [SamplingParams(temperature=0, max_tokens=4), SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=11)])
# Weight states: "original", ("noise", k) = original + k * 0.02 * fixed noise, "overflow" (finite, huge).
WEIGHT_STATES = st.sampled_from(["original", ("noise", 1), ("noise", 2), "overflow"])


@pytest.fixture(scope="module")
def world(llama_dir):
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", max_model_len=MAX_LEN,
                                    kv_cache_memory=1 << 20, max_num_seqs=8)
    original = {name: t.clone() for name, t in hf_named_weights(engine.model)}
    noise = {name: torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, (name, t) in
             enumerate(original.items())}
    return {"engine": engine, "original": original, "noise": noise, "probes": {}}


def weights_for(world, state) -> dict[str, torch.Tensor]:
    if state == "original":
        return world["original"]
    if state == "overflow":  # finite weights whose activations overflow fp32: the step fails, not the update
        return {n: t * 1e38 if n == "model.layers.1.mlp.down_proj.weight" else t for n, t in world["original"].items()}
    return {n: t + state[1] * 0.02 * world["noise"][n] for n, t in world["original"].items()}


good_params = st.builds(
    SamplingParams,
    n=st.integers(1, 3),
    temperature=st.sampled_from([0.0, 0.7, 1.0]),
    top_p=st.sampled_from([1.0, 0.9]),
    top_k=st.sampled_from([0, -1, 5]),
    seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    max_tokens=st.integers(1, 6),
    stop_token_ids=st.lists(st.integers(3, 300), max_size=2),
)
good_prompt = st.lists(st.integers(3, 300), min_size=1, max_size=20)
BAD_PARAMS = [{"n": 2.5}, {"n": True}, {"seed": 2**64}, {"seed": "abc"}, {"temperature": math.nan},
              {"stop_token_ids": None}, {"stop_token_ids": 5}, {"stop_token_ids": "ab"}, {"top_p": 0.0},
              {"max_tokens": 0}, {"min_p": math.inf}]
BAD_PROMPTS = [[], [1.7, 2.2], [True, 4], ["12", "13"], [5, 99999], list(range(3, 3 + MAX_LEN + 2)), None,
               torch.tensor([5, 6])]
BAD_UPDATES = ["nan_last", "wrong_shape", "int_dtype", "unknown_name", "meta"]

actions = st.one_of(
    st.tuples(st.just("generate"), st.lists(st.tuples(good_prompt, good_params), min_size=1, max_size=3)),
    st.tuples(st.just("bad_params"), st.sampled_from(BAD_PARAMS)),
    st.tuples(st.just("bad_prompt"), good_prompt, st.sampled_from(BAD_PROMPTS)),
    st.tuples(st.just("steps_with_bad_request"), good_prompt, st.sampled_from(BAD_PROMPTS)),
    st.tuples(st.just("abort"), good_prompt, st.integers(0, 3)),
    st.tuples(st.just("update"), WEIGHT_STATES),
    st.tuples(st.just("bad_update"), st.sampled_from(BAD_UPDATES)),
    st.tuples(st.just("sleep"), st.sampled_from([1, 2]), st.booleans()),
)


def bad_update(world, kind: str) -> dict[str, torch.Tensor]:
    """The current-looking update with one bad tensor, the bad one last so a non-atomic copy would show."""
    pairs = dict(weights_for(world, ("noise", 2)))
    last = list(pairs)[-1]
    if kind == "nan_last":
        pairs[last] = pairs[last].clone().index_fill_(0, torch.tensor([0]), math.nan)
    elif kind == "wrong_shape":
        pairs[last] = pairs[last][:-1]
    elif kind == "int_dtype":
        pairs[last] = pairs[last].to(torch.int32)
    elif kind == "unknown_name":
        pairs["model.layers.9.mlp.up_proj.weight"] = pairs[last]
    else:
        pairs[last] = torch.empty(pairs[last].shape, device="meta")
    return pairs


def run_action(world, state, action):
    """Apply one action; return the weight state after it. Every refusal must be the documented error."""
    engine, kind = world["engine"], action[0]
    if kind == "generate":
        prompts, params = zip(*action[1])
        rollouts = engine.generate(list(prompts), list(params))
        assert len(rollouts) == sum(p.n for p in params)
        for r in rollouts:
            assert r.finish_reason in ("stop", "length") and len(r.output_ids) <= params[r.prompt_index].max_tokens
    elif kind == "bad_params":
        with pytest.raises(ValueError, match=next(iter(action[1]))):
            SamplingParams(**action[1])
    elif kind == "bad_prompt":
        with pytest.raises((ValueError, PromptTooLongError), match="prompt 1"):
            engine.generate([action[1], action[2]], SamplingParams(max_tokens=2))
    elif kind == "steps_with_bad_request":
        good = engine.add_request(action[1], SamplingParams(temperature=0, max_tokens=3))
        with pytest.raises(ValueError):
            engine.add_request(action[2], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="in flight"):
            engine.add_request(action[1], request_id=good)  # a duplicate request id
        done = []
        while engine.has_unfinished():
            done.extend(engine.step())
        assert [r.request_id for r in done] == [good]
        assert done[0].finish_reason in ("stop", "length") or state == "overflow"
    elif kind == "abort":
        rid = engine.add_request(action[1], SamplingParams(max_tokens=6, ignore_eos=True))
        for _ in range(action[2]):
            engine.step()
        aborted = engine.abort(rid)
        assert all(r.finish_reason == "abort" for r in aborted) or not engine.has_unfinished()
    elif kind == "update":
        version = engine.weight_version
        engine.update_weights(weights_for(world, action[1]))
        assert engine.weight_version == version + 1
        return action[1]
    elif kind == "bad_update":
        version = engine.weight_version
        with pytest.raises(WeightError):
            engine.update_weights(bad_update(world, action[1]))
        assert engine.weight_version == version
    elif kind == "sleep":
        level, probe_while_asleep = action[1], action[2]
        engine.sleep(level)
        if probe_while_asleep:
            with pytest.raises(EngineAsleepError, match="wake_up"):
                engine.generate(*PROBE)
        engine.wake_up()
        if level == 2:  # the weights were discarded: the trainer sends them again
            engine.update_weights(weights_for(world, state))
    return state


def check_probe(world, state) -> None:
    engine = world["engine"]
    if state == "overflow":
        with pytest.raises(NonFiniteActivationError, match="update_weights"):
            engine.generate(*PROBE)
        return
    got = [(r.output_ids, r.output_logprobs) for r in engine.generate(*PROBE)]
    assert got == world["probes"].setdefault(state, got), f"probe changed under weights {state}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(actions, min_size=1, max_size=5))
@example(steps=[("bad_update", "nan_last"), ("update", ("noise", 1)), ("bad_update", "meta")])  # atomic updates
@example(steps=[("update", "overflow"), ("steps_with_bad_request", [5, 6], [1.5]), ("update", "original")])
@example(steps=[("sleep", 2, True), ("bad_prompt", [5], [True, 4]), ("abort", [7, 8], 2)])
def test_random_actions_keep_the_engine_sound(world, steps):
    engine = world["engine"]
    state = "original"
    engine.update_weights(world["original"])
    for action in steps:
        try:
            state = run_action(world, state, action)
        except NonFiniteActivationError:
            assert state == "overflow", f"{action[0]} overflowed under weights {state}"
        assert not engine.has_unfinished()
        assert engine.kv_cache_usage()["used_blocks"] == 0, f"blocks leaked after {action[0]}"
        assert engine.sleep_state is None
        check_probe(world, state)
