"""One compact decoder for Llama, Qwen2/2.5, Qwen3 and the MoE models Qwen3-MoE, Mixtral and OLMoE
(sparse layers: `moe.py`).

The families differ only in switches read from the config: q/k/v bias (Qwen2), per-head q/k
RMSNorm before RoPE (Qwen3) or one over the whole q and k projections (OLMoE), RoPE scaling
(Llama 3). Weights live in a fused layout (`qkv_proj`, `gate_up_proj`) so a step runs one matmul
where HF runs three; `weights.py` maps HF checkpoint names onto it.

`forward` takes the flattened tokens of a step, their positions and an AttentionMetadata. With
KV caches it is the engine's step; without, it is causal attention within packed sequences, the
same code with autograd for the trainer side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parity.kernels.dispatch import Kernels
from parity.kernels.metadata import AttentionMetadata
from parity.models.config import ModelConfig
from parity.models.moe import Routing, SparseMoeBlock
from parity.models.rope import cos_sin_tables
from parity.precision.policy import PrecisionPolicy, check_activations


def _param(*shape: int, dtype: torch.dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels: Kernels, dtype, device):
        super().__init__()
        self.kernels = kernels
        self.eps = eps
        self.weight = _param(size, dtype=dtype, device=device)

    def forward(self, x, residual=None, into: Linear | None = None, silu_and_mul: bool = False):
        """RMSNorm of x (+ residual: then also returns the sum). With `into`, that projection of the normalised value
        in its place (SiLU-and-mul of it with `silu_and_mul`): `Kernels.rms_norm_linear`, one kernel where fast mode
        fuses them."""
        if into is None:
            return self.kernels.rms_norm(x, self.weight, self.eps, residual)
        return self.kernels.rms_norm_linear(x, self.weight, self.eps, into.weight, into.bias, residual, silu_and_mul)


class Linear(nn.Module):
    """y = x W^T (+ b), weights stored as HF stores them ([out, in])."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kernels: Kernels, dtype, device):
        super().__init__()
        self.kernels = kernels
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x):
        return self.kernels.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, dtype, device):
        super().__init__()
        self.kernels = kernels
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, cfg.attention_bias, kernels, dtype, device)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, False, kernels, dtype, device)
        # where the q/k norm runs: inside the per-head rope kernel (Qwen3), or before it over the projection (OLMoE)
        self.norm_per_head = cfg.qk_norm and cfg.qk_norm_scope == "head"
        self.norm_projection = cfg.qk_norm and cfg.qk_norm_scope != "head"
        if cfg.qk_norm:
            q_dim, k_dim = cfg.qk_norm_dims
            self.q_norm = RMSNorm(q_dim, cfg.rms_norm_eps, kernels, dtype, device)
            self.k_norm = RMSNorm(k_dim, cfg.rms_norm_eps, kernels, dtype, device)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, qkv, cos, sin, kv_cache, meta: AttentionMetadata):
        """From `qkv_proj`'s output, which the input norm computes (`RMSNorm.forward(into=)`)."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.norm_projection:
            q, k = self.q_norm(q.contiguous()), self.k_norm(k.contiguous())
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        # Qwen3's per-head q/k norm, RoPE and the KV-cache write: one kernel in fast mode on CUDA, the decode
        # step's attention kernel itself in a decode step.
        q_norm, k_norm = (self.q_norm.weight, self.k_norm.weight) if self.norm_per_head else (None, None)
        eps = self.q_norm.eps if self.norm_per_head else None
        out = self.kernels.rope_and_attention(q, k, v, cos, sin, q_norm, k_norm, eps, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, dtype, device):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, kernels, dtype, device)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, kernels, dtype, device)

    def forward(self, h):
        """From SiLU-and-mul of `gate_up_proj`'s output, which the post-attention norm computes
        (`RMSNorm.forward(into=, silu_and_mul=True)`)."""
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels, dtype, device, routing: Routing | None = None,
                 layer_index: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device)
        self.self_attn = Attention(cfg, kernels, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device)
        if layer_index in cfg.moe_layers:  # Qwen3-MoE's sparse layers
            moe_index = cfg.moe_layers.index(layer_index)
            self.mlp = SparseMoeBlock(cfg, kernels, dtype, device, routing, moe_index)
        else:
            self.mlp = MLP(cfg, kernels, dtype, device)

    def forward(self, x, residual, cos, sin, kv_cache, meta):
        # The residual add is fused into the norm: (x + residual) then normalise, as HF orders it. Each norm also runs
        # the projection that reads it (qkv; the dense MLP's gate_up with SiLU-and-mul), in one kernel where fast mode
        # fuses them; a sparse MoE block routes the normalised value itself. Every part is still called as a module,
        # so the inf/nan locator's hooks see each (a norm's output is then its projection).
        qkv_proj = self.self_attn.qkv_proj
        if residual is None:
            residual, qkv = x, self.input_layernorm(x, into=qkv_proj)
        else:
            qkv, residual = self.input_layernorm(x, residual, into=qkv_proj)
        x = self.self_attn(qkv, cos, sin, kv_cache, meta)
        if isinstance(self.mlp, MLP):
            h, residual = self.post_attention_layernorm(x, residual, into=self.mlp.gate_up_proj, silu_and_mul=True)
        else:
            h, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, policy: PrecisionPolicy, device, max_positions: int):
        """`policy` holds every numeric switch (dtype, logits_fp32, deterministic, check_finite)."""
        super().__init__()
        self.config = cfg
        self.policy = policy
        self.check_finite = policy.check_finite  # switched off while a non-finite forward is re-run
        self.kernels = Kernels(deterministic=policy.deterministic)
        kernels = self.kernels
        self.dtype = dtype = policy.torch_dtype
        self.logits_fp32 = policy.logits_fp32
        self.embed_tokens = _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        # The MoE blocks' shared routing record/replay (unused by a dense model).
        self.routing = Routing(len(cfg.moe_layers), cfg.num_experts_per_tok)
        self.layers = nn.ModuleList(DecoderLayer(cfg, kernels, dtype, device, self.routing, i)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, kernels, dtype, device)
        self.lm_head = None if cfg.tie_word_embeddings else _param(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        cos, sin = cos_sin_tables(cfg.hf_config, cfg.head_dim, max_positions, dtype, device)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens if self.lm_head is None else self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] of the flattened tokens."""
        x = self.embed(input_ids)
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, cos, sin, None if kv_caches is None else kv_caches[i], meta)
        x, _ = self.norm(x, residual)
        if self.check_finite:  # one isfinite + sync; on inf/nan, re-run to name the layer
            check_activations(self, x, lambda: self.forward(input_ids, positions, meta, kv_caches))
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [num_tokens, hidden] (a tensor-parallel model looks up its vocabulary shard)."""
        return F.embedding(input_ids, self.embed_tokens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits. With logits_fp32 the LM head itself runs in float32 (MiniMax-M1's fix);
        otherwise it runs in the compute dtype and only the result is upcast."""
        if self.logits_fp32:
            return self.kernels.linear_fp32(hidden, self.lm_head_weight)
        return self.kernels.linear(hidden, self.lm_head_weight).float()
