"""Sleep / wake: memory is released and measured, the same parameters come back, outputs are identical."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from parity import Engine, SamplingParams
from parity.engine.sleep import EngineAsleepError

PROMPTS = ["What is 3 + 4?", "Sort the list 5 3 9 1", "Hello world! How are you"]
PARAMS = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=3)


def make_engine(model_dir: str, device: str = "cpu") -> Engine:
    return Engine.from_pretrained(model_dir, dtype="fp32", device=device, kv_cache_memory=1 << 21, max_model_len=128)


def outputs(engine: Engine) -> list[tuple[list[int], list[float]]]:
    return [(r.output_ids, r.output_logprobs) for r in engine.generate(PROMPTS, PARAMS)]


def weight_bytes(engine: Engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())


def test_level1_round_trip_is_identical(llama_dir):
    engine = make_engine(llama_dir)
    reference = outputs(engine)
    assert engine.scheduler.block_manager.cached  # the prompts left cached prefixes behind
    params = list(engine.model.parameters())
    kv_bytes = engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()

    stats = engine.sleep(level=1)
    assert stats.kv_cache_bytes == kv_bytes > 0
    assert stats.weight_bytes == stats.host_bytes == weight_bytes(engine)
    assert stats.freed_bytes == kv_bytes  # on CPU the offloaded weights stay in host memory
    assert engine.runner.kv_cache is None
    assert all(p.untyped_storage().nbytes() == 0 for p in params)  # really released
    assert engine.scheduler.block_manager.cached == {}
    with pytest.raises(EngineAsleepError, match="wake_up"):
        engine.generate(PROMPTS, PARAMS)
    with pytest.raises(EngineAsleepError, match="already asleep"):
        engine.sleep()
    with pytest.raises(EngineAsleepError, match="wake_up"):
        engine.update_weights({})

    wake = engine.wake_up()
    assert wake.restored_bytes == kv_bytes + weight_bytes(engine)
    assert engine.sleep_state is None
    assert all(a is b for a, b in zip(params, engine.model.parameters()))  # same Parameter objects
    assert outputs(engine) == reference
    with pytest.raises(EngineAsleepError, match="not asleep"):
        engine.wake_up()


def test_level2_discards_weights_until_updated(llama_dir):
    engine = make_engine(llama_dir)
    reference = outputs(engine)
    trainer = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    stats = engine.sleep(level=2)
    assert stats.host_bytes == 0
    assert stats.freed_bytes == stats.kv_cache_bytes + weight_bytes(engine)
    with pytest.raises(EngineAsleepError, match="wake_up"):
        engine.update_weights(trainer)  # no storage to copy into yet

    # vLLM's order: wake the weights, update them, then wake the KV cache.
    engine.wake_up(tags=["weights"])
    with pytest.raises(EngineAsleepError, match="update_weights"):
        engine.generate(PROMPTS, PARAMS)
    engine.update_weights(trainer)
    with pytest.raises(EngineAsleepError, match="asleep"):
        engine.generate(PROMPTS, PARAMS)
    engine.wake_up(tags=["kv_cache"])
    assert engine.sleep_state is None
    assert outputs(engine) == reference


def test_sleep_refused_with_requests_in_flight(llama_dir):
    engine = make_engine(llama_dir)
    with pytest.raises(ValueError, match="level"):
        engine.sleep(level=3)
    engine.add_request("Hello", SamplingParams(max_tokens=4))
    engine.step()
    with pytest.raises(RuntimeError, match="in flight"):
        engine.sleep()
    while engine.has_unfinished():
        engine.step()
    engine.sleep()
    with pytest.raises(ValueError, match="tag"):
        engine.wake_up(tags=["kv"])


@pytest.mark.gpu
def test_cuda_sleep_frees_measured_memory(llama_dir):
    engine = make_engine(llama_dir, device="cuda")
    reference = outputs(engine)
    stats = engine.sleep(level=1)
    expected = stats.kv_cache_bytes + stats.weight_bytes
    assert stats.freed_bytes >= 0.99 * expected, stats
    assert stats.after.allocated < stats.before.allocated
    engine.wake_up()
    assert outputs(engine) == reference
