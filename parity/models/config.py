"""The model facts parity needs, read from an HF `config.json` (via transformers' config classes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

# HF architecture name -> our family. All share one decoder with per-family switches.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",  # Qwen3 attention; sparse layers run the mixture-of-experts block (moe.py)
    "MixtralForCausalLM": "mixtral",  # Llama attention; every layer sparse, top-k weights always renormalised
    "OlmoeForCausalLM": "olmoe",  # q/k RMSNorm over the whole projection; every layer sparse
}
MOE_FAMILIES = ("qwen3_moe", "mixtral", "olmoe")


# RoPE types whose tables are static and computed by transformers' own init functions (rope.py). "dynamic"
# and "longrope" rescale with the sequence length while running, which a precomputed table cannot follow.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture, or a value in its config, is not one parity implements."""


def _sliding_layers(hf_config: Any) -> list[int]:
    """Layers that HF runs with sliding-window attention: `layer_types` (transformers >= 4.53), else
    Qwen2's older rule (use_sliding_window and layer index >= max_window_layers)."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if getattr(hf_config, "use_sliding_window", False) and getattr(hf_config, "sliding_window", None) is not None:
        return list(range(getattr(hf_config, "max_window_layers", 0), hf_config.num_hidden_layers))
    return []


def refuse_unimplemented(hf_config: Any, architecture: str) -> None:
    """Raise UnsupportedModelError for a config value the decoder does not implement, so an unsupported
    checkpoint fails at load instead of giving silently wrong logprobs. The message names the field."""
    from parity.models.rope import rope_parameters

    family = SUPPORTED_ARCHITECTURES[architecture]

    def refuse(field: str, value: Any, why: str) -> None:
        raise UnsupportedModelError(f"{architecture} config {field}={value!r}: {why}")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings"):
        value = getattr(hf_config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            refuse(name, value, "must be a positive int")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in SILU_NAMES:
        refuse("hidden_act", act, "parity's MLP implements silu (SwiGLU) only")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        refuse("num_key_value_heads", kv_heads, f"must divide num_attention_heads={heads}")
    if family != "qwen2" and getattr(hf_config, "attention_bias", False):
        # Llama, Qwen3 and OLMoE bias o_proj as well as q/k/v; Qwen2 biases q/k/v only, which is what parity has.
        refuse("attention_bias", True, "this architecture then biases o_proj too, which parity does not implement")
    layer_types = getattr(hf_config, "layer_types", None) or []
    other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
    if other:
        refuse("layer_types", other, "parity implements full causal attention only")
    window = getattr(hf_config, "sliding_window", None)
    sliding = _sliding_layers(hf_config)
    if sliding and window is not None and window < hf_config.max_position_embeddings:
        refuse("sliding_window", window, f"layers {sliding} use sliding-window attention (use_sliding_window="
               f"{getattr(hf_config, 'use_sliding_window', None)}); parity implements full causal attention only")
    rope = rope_parameters(hf_config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        refuse("rope_type", rope_type, f"parity implements RoPE types {', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        refuse("partial_rotary_factor", partial, "parity rotates the whole head dimension")
    if family in MOE_FAMILIES:
        _refuse_unimplemented_moe(hf_config, family, refuse)
    quant = getattr(hf_config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        refuse("quantization_config", f"quant_method={method}", "parity loads unquantized fp16/bf16/fp32 "
               "safetensors (or a GGUF file, which it dequantizes)")


def _refuse_unimplemented_moe(hf_config: Any, family: str, refuse) -> None:
    """The mixture-of-experts fields of a Qwen3-MoE, Mixtral or OLMoE config (HF's names; Mixtral's
    `num_local_experts` reads as `num_experts` through its config's attribute map)."""
    sizes = ("num_experts", "num_experts_per_tok") + (("moe_intermediate_size", "decoder_sparse_step")
                                                      if family == "qwen3_moe" else ())
    for name in sizes:
        value = getattr(hf_config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            refuse(name, value, "must be a positive int")
    if hf_config.num_experts_per_tok > hf_config.num_experts:
        refuse("num_experts_per_tok", hf_config.num_experts_per_tok, f"exceeds num_experts={hf_config.num_experts}")
    only = getattr(hf_config, "mlp_only_layers", None) or []
    if not isinstance(only, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
        refuse("mlp_only_layers", only, "must be a list of layer indices")
    if getattr(hf_config, "shared_expert_intermediate_size", 0):
        refuse("shared_expert_intermediate_size", hf_config.shared_expert_intermediate_size,
               "parity's MoE block has no shared expert")
    window = getattr(hf_config, "sliding_window", None)
    if family == "mixtral" and window is not None and window < hf_config.max_position_embeddings:
        refuse("sliding_window", window, "Mixtral then attends within a sliding window in every layer; parity "
               "implements full causal attention only")
    if family == "olmoe":
        clip = getattr(hf_config, "clip_qkv", None)
        if clip is not None:
            refuse("clip_qkv", clip, "OLMoE then clamps q/k/v, which parity does not implement")
        head_dim = getattr(hf_config, "head_dim", None)
        if head_dim is not None and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
            refuse("head_dim", head_dim, "OLMoE's q/k norms are sized by hidden_size // num_attention_heads; "
                   "parity needs head_dim * num_attention_heads == hidden_size")


def moe_layer_indices(hf_config: Any, family: str) -> tuple[int, ...]:
    """The layers HF builds as sparse MoE blocks (every layer of Mixtral and OLMoE; Qwen3MoeDecoderLayer's
    rule for Qwen3-MoE); the others run a dense MLP."""
    num_experts = getattr(hf_config, "num_experts", 0) or 0
    if family not in MOE_FAMILIES or num_experts < 1:
        return ()
    if family != "qwen3_moe":
        return tuple(range(hf_config.num_hidden_layers))
    only = set(getattr(hf_config, "mlp_only_layers", None) or [])
    step = hf_config.decoder_sparse_step
    return tuple(i for i in range(hf_config.num_hidden_layers) if i not in only and (i + 1) % step == 0)


@dataclass
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    # "head": one RMSNorm over each head (Qwen3); "projection": over the whole q (k) projection (OLMoE).
    qk_norm_scope: Literal["head", "projection"] = "head"
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: torch.dtype | None = None
    hf_config: Any = None  # the transformers config object (RoPE parameters are read from it)
    # Mixture of experts (Qwen3-MoE, Mixtral, OLMoE); moe_layers is empty for a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> ModelConfig:
        archs = list(getattr(hf_config, "architectures", None) or [])
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or getattr(hf_config, 'model_type', '?')}; "
                f"parity supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        refuse_unimplemented(hf_config, arch)
        moe = family in MOE_FAMILIES
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        eos = getattr(hf_config, "eos_token_id", None)
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return cls(
            architecture=arch,
            family=family,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias; Llama and Qwen3 read it from the config.
            attention_bias=family == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=family == "llama" and bool(getattr(hf_config, "mlp_bias", False)),  # Qwen MLPs have none
            qk_norm=family in ("qwen3", "qwen3_moe", "olmoe"),
            qk_norm_scope="projection" if family == "olmoe" else "head",
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            bos_token_id=getattr(hf_config, "bos_token_id", None),
            torch_dtype=dtype if isinstance(dtype, torch.dtype) else None,
            hf_config=hf_config,
            num_experts=hf_config.num_experts if moe else 0,
            num_experts_per_tok=hf_config.num_experts_per_tok if moe else 0,
            # Mixtral's and OLMoE's experts are intermediate_size wide (they have no dense layers).
            moe_intermediate_size=(hf_config.moe_intermediate_size if family == "qwen3_moe"
                                   else hf_config.intermediate_size if moe else 0),
            # Mixtral's router always renormalises its top-k (MixtralTopKRouter has no switch).
            norm_topk_prob=family == "mixtral" or bool(getattr(hf_config, "norm_topk_prob", False)),
            moe_layers=moe_layer_indices(hf_config, family),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        from transformers import AutoConfig

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; expected an HF-format model directory")
        try:
            hf_config = AutoConfig.from_pretrained(model_dir)
        except ValueError as e:  # transformers does not know the model_type at all
            raise UnsupportedModelError(f"cannot read {model_dir / 'config.json'}: {e}") from e
        config = cls.from_hf_config(hf_config)
        gen_path = model_dir / "generation_config.json"
        if gen_path.is_file():
            from transformers import GenerationConfig

            gen_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
            if gen_eos is not None:
                config.eos_token_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
        return config

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qk_norm_dims(self) -> tuple[int, int]:
        """The q and k norms' weight sizes: one head (Qwen3) or the whole projection (OLMoE)."""
        return (self.head_dim, self.head_dim) if self.qk_norm_scope == "head" else (self.q_size, self.kv_size)
