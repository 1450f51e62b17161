"""The one model loader: what it builds from an HF directory, checked against the checkpoint file itself."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from parity.models.decoder import DecoderModel
from parity.models.loader import Checkpoint, load
from parity.models.weights import WeightMap, hf_named_weights
from parity.precision.policy import PrecisionPolicy


def test_loads_every_checkpoint_tensor_in_the_policy_dtype(llama_dir):
    policy = PrecisionPolicy("bf16", deterministic=True)
    loaded = load(llama_dir, policy, "cpu")
    assert loaded.model.policy == policy and loaded.model.kernels.deterministic
    assert loaded.max_positions == loaded.config.max_position_embeddings == loaded.model.cos_table.shape[0]
    stored = load_file(str(Path(llama_dir) / "model.safetensors"))
    ours = dict(hf_named_weights(loaded.model))
    assert set(ours) == set(stored) - {"lm_head.weight"}  # tied embeddings: one tensor
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, stored[name].to(torch.bfloat16)), name
    text = "What is 12 + 34?"
    assert loaded.tokenizer.encode(text) == AutoTokenizer.from_pretrained(llama_dir).encode(text)


def test_builder_and_weight_map_are_the_callers(llama_dir):
    """What tensor parallelism relies on: its own model class and a weight map that sees every tensor."""
    seen: list[str] = []

    class RecordingMap(WeightMap):
        def copy(self, name, tensor):
            seen.append(name)
            super().copy(name, tensor)

    class Shard(DecoderModel):
        def __init__(self, cfg, policy, device, max_positions, tag):
            super().__init__(cfg, policy, device, max_positions)
            self.tag = tag

    loaded = load(Checkpoint.resolve(llama_dir), PrecisionPolicy("fp32"), "cpu", 64,
                  build=functools.partial(Shard, tag="rank0"), weight_map=lambda m: RecordingMap(m, m.config))
    assert loaded.model.tag == "rank0" and loaded.model.cos_table.shape[0] == 64
    assert sorted(seen) == sorted(load_file(str(Path(llama_dir) / "model.safetensors")))


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an HF model directory"):
        Checkpoint.resolve(tmp_path)
