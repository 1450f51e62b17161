"""The precision policy: HF's cast order for RMSNorm and RoPE (bitwise against transformers' own
modules), and fp16 overflow that raises naming the layer instead of returning nan logprobs."""

from __future__ import annotations

import pytest
import torch

from parity.engine.engine import Engine
from parity.engine.sampling_params import SamplingParams
from parity.kernels import invariant, reference
from parity.kernels.metadata import AttentionMetadata
from parity.models.rope import cos_sin_tables
from parity.precision.policy import NonFiniteActivationError, PrecisionPolicy
from parity.trainer.parity_model import parity_model_from_engine, token_logprobs

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_hf_llama_rmsnorm_bitwise(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(64, generator=g))
    x = (3 * torch.randn(37, 64, generator=g)).to(dtype)
    res = torch.randn(37, 64, generator=g).to(dtype)
    assert torch.equal(reference.rms_norm(x, norm.weight, 1e-6), norm(x))
    out, summed = reference.rms_norm(x, norm.weight, 1e-6, res)
    assert torch.equal(summed, x + res) and torch.equal(out, norm(x + res))  # HF adds the residual first
    assert torch.equal(invariant.rms_norm(x, norm.weight, 1e-6), norm(x))


def _rope_configs():
    from transformers import LlamaConfig, Qwen3Config

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    return [
        LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=1024, rope_scaling=llama3),
        Qwen3Config(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=1024),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_tables_and_rotation_match_hf_bitwise(dtype):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 5, 63, 64, 65, 300, 1023]])
    for cfg in _rope_configs():
        cos_hf, sin_hf = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 8, 16, dtype=dtype), positions)
        cos_t, sin_t = cos_sin_tables(cfg, 16, 1024, dtype, "cpu")
        cos, sin = cos_t[positions[0]], sin_t[positions[0]]
        assert cos.dtype == dtype and torch.equal(cos, cos_hf[0]) and torch.equal(sin, sin_hf[0])
        q = torch.randn(8, 4, 16, generator=g).to(dtype)
        k = torch.randn(8, 2, 16, generator=g).to(dtype)
        q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos_hf, sin_hf)
        q_ours, k_ours = reference.apply_rotary(q, k, cos, sin)
        assert torch.equal(q_ours, q_hf[0].transpose(0, 1)) and torch.equal(k_ours, k_hf[0].transpose(0, 1))


def test_policy_names():
    policy = PrecisionPolicy(dtype="bfloat16", deterministic=True)
    assert policy.dtype == "bf16" and policy.torch_dtype == torch.bfloat16 and policy.logits_fp32
    with pytest.raises(ValueError, match="unknown dtype"):
        PrecisionPolicy(dtype="fp8")


def _overflowing_engine(model_dir: str, dtype: str, **kwargs) -> Engine:
    """Layer 1's MLP output projection scaled by 1e4: its outputs exceed fp16's 65504."""
    engine = Engine.from_pretrained(model_dir, dtype=dtype, kv_cache_memory=1 << 20, max_model_len=128, **kwargs)
    with torch.no_grad():
        engine.model.layers[1].mlp.down_proj.weight.mul_(1e4)
    return engine


@pytest.mark.parametrize("deterministic", [False, True])
def test_fp16_overflow_raises_naming_the_layer(llama_dir, deterministic):
    engine = _overflowing_engine(llama_dir, "fp16", deterministic=deterministic)
    assert PrecisionPolicy.of_model(engine.model) == PrecisionPolicy("fp16", True, deterministic, True)
    with pytest.raises(NonFiniteActivationError, match=r"layer 1 \(mlp\) produced inf/nan in fp16 from finite inputs"):
        engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3))
    trainer = parity_model_from_engine(engine)  # the trainer-side forward raises the same way
    with pytest.raises(NonFiniteActivationError, match=r"layer 1 \(mlp\)"):
        token_logprobs(trainer, [[5, 6, 7, 8]], [[9, 10]])


def test_same_weights_in_fp32_do_not_raise_and_check_can_be_disabled(llama_dir):
    out = _overflowing_engine(llama_dir, "fp32").generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3))
    assert all(torch.isfinite(torch.tensor(out[0].output_logprobs)))
    unchecked = _overflowing_engine(llama_dir, "fp16", check_finite=False)
    hidden = unchecked.model(torch.tensor([5, 6, 7]), torch.arange(3), AttentionMetadata.for_packed_sequences([3], "cpu"))
    assert not bool(torch.isfinite(hidden).all())  # what the check exists to catch
