"""EngineConfig refuses a bad option before anything loads, naming the field and the value."""

from __future__ import annotations

import pytest
import torch

from parity import Engine, EngineConfig


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_model_len", 0, r"max_model_len must be >= 1, got 0"),
        ("max_model_len", 64.0, r"max_model_len must be an int, got 64\.0 \(float\)"),
        ("block_size", 0, r"block_size must be >= 1, got 0"),
        ("block_size", "16", r"block_size must be an int, got '16' \(str\)"),
        ("kv_cache_memory", -5, r"kv_cache_memory must be >= 1, got -5"),
        ("memory_utilization", float("nan"), r"memory_utilization must be a finite number, got nan"),
        ("memory_utilization", 0.0, r"memory_utilization must be > 0\.0 and <= 1\.0, got 0\.0"),
        ("max_num_seqs", 0, r"max_num_seqs must be >= 1, got 0"),
        ("max_num_batched_tokens", True, r"max_num_batched_tokens must be an int, got True \(bool\)"),
        ("enforce_eager", "no", r"enforce_eager must be True or False, got 'no' \(str\)"),
        ("deterministic", 1, r"deterministic must be True or False, got 1 \(int\)"),
        ("seed", -1, r"seed must be >= 0"),
        ("dtype", "fp8", r"dtype: unknown dtype 'fp8'"),
        ("dtype", "int8", r"dtype: unknown dtype 'int8'"),
        ("device", "gpu", r"device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
        ("device", "meta", r"device='meta': parity runs on 'cpu' or 'cuda'"),
    ],
)
def test_bad_option_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message seen without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match=r"device='cuda' but CUDA is not available.*device='cpu'"):
        EngineConfig(device="cuda")


def test_good_options_kept():
    cfg = EngineConfig(dtype="bf16", device="cpu", max_model_len=128, kv_cache_memory=2**20, memory_utilization=1)
    assert (cfg.device, cfg.max_model_len, cfg.memory_utilization) == ("cpu", 128, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_model_len": 0}, "max_model_len must be >= 1, got 0"),
    ({"max_model_len": 1025}, "max_model_len/max_positions=1025 exceeds the model's max_position_embeddings=1024"),
])
def test_engine_refuses_context_length(llama_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine.from_pretrained(llama_dir, device="cpu", **kwargs)


def test_context_length_up_to_the_models_positions(llama_dir):
    engine = Engine.from_pretrained(llama_dir, device="cpu", dtype="fp32", max_model_len=1024, kv_cache_memory=2**20)
    assert engine.max_model_len == 1024 == engine.model_config.max_position_embeddings
