"""Rotary-embedding tables, computed like HF transformers (float32 angles, cast to the compute dtype)."""

from __future__ import annotations

import torch


def rope_parameters(hf_config) -> dict:
    """transformers >= 5 keeps RoPE settings in `rope_parameters`; 4.x in `rope_theta`/`rope_scaling`."""
    params = getattr(hf_config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return params


def inv_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale; non-default types (llama3, yarn, ...) use transformers'
    own init functions so scaling rules stay identical to the trainer's."""
    params = rope_parameters(hf_config)
    if params.get("rope_type", "default") == "default":
        base = params["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def cos_sin_tables(
    hf_config, head_dim: int, max_positions: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """[max_positions, head_dim] cos and sin tables in `dtype`; row p equals HF's value at position p."""
    inv_freq, scaling = inv_frequencies(hf_config, head_dim)
    positions = torch.arange(max_positions, dtype=torch.float)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device=device, dtype=dtype), (emb.sin() * scaling).to(device=device, dtype=dtype)
