"""Random good and bad requests, weight updates, aborts and sleeps in random order: after each, either it
worked or it raised a clear error, every KV block is free again, and a fixed probe gives the same output
unless the weights changed (then the output of those weights)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import Engine, SamplingParams
from parity.models.weights import WeightError, hf_named_weights

PROBE = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
SAMPLED = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=1, ignore_eos=True)
OPS = ["good", "bad_prompt", "bad_params", "duplicate_id", "update", "bad_update", "abort", "sleep1", "sleep2"]


@pytest.fixture(scope="module")
def setup(llama_dir):
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", block_size=4, deterministic=True)
    weights_a = {k: v.clone() for k, v in hf_named_weights(engine.model)}
    weights_b = {k: v * 1.05 for k, v in weights_a.items()}
    probes = {}
    for name, w in (("b", weights_b), ("a", weights_a)):
        engine.update_weights(w)
        probes[name] = probe(engine)
    assert probes["a"] != probes["b"]
    return engine, {"a": weights_a, "b": weights_b}, probes


def probe(engine: Engine):
    return [(r.output_ids, r.output_logprobs) for r in engine.generate(PROBE, GREEDY)]


def apply(engine: Engine, op: str, weights: dict, current: str) -> str:
    """Run one operation; return the name of the weights the engine holds afterwards."""
    if op == "good":
        assert len(engine.generate([[7, 8, 9], "hello"], SAMPLED)) == 4
    elif op == "bad_prompt":
        with pytest.raises(ValueError, match="prompt 1: the token at position 0 must be an int id"):
            engine.generate([[5, 6], [1.5, 2]], GREEDY)
    elif op == "bad_params":
        with pytest.raises(ValueError, match="prompt 0: params must be a SamplingParams"):
            engine.generate([[5, 6]], [{"temperature": 0}])
    elif op == "duplicate_id":
        engine.add_request([5, 6, 7], SAMPLED, request_id="dup")
        with pytest.raises(ValueError, match="already in flight"):
            engine.add_request([5, 6, 7], SAMPLED, request_id="dup")
        engine.step()
        assert {r.finish_reason for r in engine.abort("dup")} <= {"abort", "length"}
    elif op == "update":
        current = "b" if current == "a" else "a"
        engine.update_weights(weights[current])
    elif op == "bad_update":
        bad = dict(weights["b" if current == "a" else "a"])
        bad["model.norm.weight"] = torch.full_like(bad["model.norm.weight"], float("inf"))
        with pytest.raises(WeightError, match="model.norm.weight"):
            engine.update_weights(bad)
    elif op == "abort":
        engine.add_request(list(range(30, 50)), SAMPLED, request_id="long")
        engine.step()
        engine.step()
        assert all(r.finish_reason == "abort" for r in engine.abort_all())
    elif op == "sleep1":
        engine.sleep(level=1)
        engine.wake_up()
    elif op == "sleep2":  # vLLM's order: wake the weights, load them, wake the KV cache
        engine.sleep(level=2)
        engine.wake_up(tags=["weights"])
        engine.update_weights(weights[current])
        engine.wake_up(tags=["kv_cache"])
    return current


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=6))
def test_random_operations_leave_the_engine_consistent(setup, ops):
    engine, weights, probes = setup
    engine.update_weights(weights["a"])
    current = "a"
    for op in ops:
        current = apply(engine, op, weights, current)
        assert not engine.has_unfinished(), op
        bm = engine.scheduler.block_manager
        assert bm.num_used_blocks == 0 and all(c == 0 for c in bm.ref_counts), op
        assert probe(engine) == probes[current], op
