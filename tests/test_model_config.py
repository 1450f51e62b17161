"""Config values the decoder does not implement are refused at load, naming the field; supported ones load
with exactly the tensors transformers' own model has."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from parity import Engine
from parity.models.config import ModelConfig, UnsupportedModelError
from parity.models.weights import build_weight_map

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {"llama": (LlamaConfig, "LlamaForCausalLM"), "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
           "qwen3": (Qwen3Config, "Qwen3ForCausalLM")}


def hf_config(family: str, **overrides):
    cls, arch = CONFIGS[family]
    return cls(architectures=[arch], **{**SMALL, **overrides})


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("llama", {"hidden_act": "relu"}, r"LlamaForCausalLM config hidden_act='relu': .*silu"),
        ("llama", {"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ("qwen2", {"hidden_act": "gelu_pytorch_tanh"}, r"hidden_act='gelu_pytorch_tanh'"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0},
         r"Qwen2ForCausalLM config sliding_window=8: layers \[0, 1, 2\] use sliding-window attention"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}, r"layers \[2\]"),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}, r"sliding_window=16"),
        ("llama", {"attention_bias": True}, r"attention_bias=True: .*o_proj"),
        ("qwen3", {"attention_bias": True}, r"Qwen3ForCausalLM config attention_bias=True"),
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_type='dynamic'"),
        ("qwen2", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, r"rope_type='dynamic'"),
        ("llama", {"num_attention_heads": 4, "num_key_value_heads": 3}, r"num_key_value_heads=3: must divide"),
        ("llama", {"max_position_embeddings": 0}, r"max_position_embeddings=0: must be a positive int"),
    ],
)
def test_unimplemented_value_refused(family, overrides, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_hf_config(hf_config(family, **overrides))


def test_partial_rotary_refused():
    cfg = hf_config("llama")
    cfg.partial_rotary_factor = 0.5
    with pytest.raises(UnsupportedModelError, match=r"partial_rotary_factor=0\.5"):
        ModelConfig.from_hf_config(cfg)


def test_quantized_checkpoint_refused():
    cfg = hf_config("qwen2")
    cfg.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(UnsupportedModelError, match=r"quantization_config='quant_method=gptq'"):
        ModelConfig.from_hf_config(cfg)


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("llama", {"mlp_bias": True, "tie_word_embeddings": True, "head_dim": 8}),
        ("llama", {"hidden_act": "swish", "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
        ("qwen2", {}),
        ("qwen2", {"mlp_bias": True}),  # not a Qwen2 field: HF's Qwen2 MLP has no bias whatever the config says
        ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3}),  # no layer slides
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}),  # window covers all
        ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}),
        ("qwen3", {"tie_word_embeddings": True, "head_dim": 8}),
    ],
)
def test_supported_config_has_hf_tensors(family, overrides):
    """The tensors parity expects are exactly those of transformers' model for the same config."""
    cfg = hf_config(family, **overrides)
    ours = ModelConfig.from_hf_config(cfg)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(cfg)
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()
                 if not (ours.tie_word_embeddings and k == "lm_head.weight")}
    assert {k: t.shape for k, t in build_weight_map(ours).items()} == hf_shapes


def test_refused_at_engine_load_before_weights(llama_dir, tmp_path):
    """The issue's case: a Llama directory whose config says relu is refused when the engine loads it."""
    path = tmp_path / "m"
    shutil.copytree(llama_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "model.safetensors").unlink()  # refused from the config alone, before any weight is read
    with pytest.raises(UnsupportedModelError, match="hidden_act='relu'"):
        Engine.from_pretrained(path, device="cpu")


@pytest.mark.parametrize("corrupt, message", [
    (lambda t: t.to(torch.int32), r"non-float checkpoint tensor\(s\) model\.layers\.0\.mlp\.up_proj\.weight \(I32\)"),
    (lambda t: t.index_fill(0, torch.tensor([3]), float("nan")), r"'model\.layers\.0\.mlp\.up_proj\.weight' holds NaN"),
    (lambda t: t.index_fill(1, torch.tensor([0]), float("inf")), r"'model\.layers\.0\.mlp\.up_proj\.weight' holds NaN or inf"),
])
def test_checkpoint_tensor_refused(llama_dir, tmp_path, corrupt, message):
    """An integer tensor is not cast silently, and a non-finite one fails at load, not at the first step."""
    from safetensors.torch import load_file, save_file

    from parity.models.weights import WeightError

    path = tmp_path / "m"
    shutil.copytree(llama_dir, path)
    weights = load_file(path / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name] = corrupt(weights[name])
    save_file(weights, path / "model.safetensors")
    with pytest.raises(WeightError, match=message):
        Engine.from_pretrained(path, device="cpu")
