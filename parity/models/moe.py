"""The sparse mixture-of-experts block of Qwen3-MoE, Mixtral and OLMoE, and the record/replay of its routing.

A sparse layer's MLP is a router (`gate`, a [E, H] linear) and E SwiGLU experts stored fused, as HF
transformers 5 holds them in memory: `experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
`experts.down_proj` [E, H, I]. Checkpoints store one tensor per expert (`mlp.experts.{e}.gate_proj.weight`;
Mixtral's `block_sparse_moe.experts.{e}.w1.weight`); `weights.py` maps those into slices of the fused tensors.
The three routers are one computation: float32 softmax over all experts, top-k, renormalised to sum 1 when
`norm_topk_prob` (always for Mixtral). One difference below fp32: HF's Mixtral multiplies the expert outputs
by float32 weights, the others (and parity, for all three) by weights cast to the compute dtype.

Routing replay: every block of a model shares one `Routing`. With `record` set, each forward keeps the
experts it chose per token ([T, k] per MoE layer); given `replay` ([T, MoE layers, k]), the blocks route
every token through the given experts instead of their own top-k (the weights still come from this
model's router softmax, so the router gets its gradient). The engine records (`Rollout.routed_experts`),
the trainer replays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from parity.kernels.dispatch import Kernels
from parity.models.config import ModelConfig


@dataclass
class Routing:
    """The routing state shared by a model's MoE blocks for one forward."""

    num_layers: int  # MoE layers in the model
    top_k: int
    record: bool = False
    replay: torch.Tensor | None = None  # [T, num_layers, k] expert ids for this forward's tokens
    recorded: list[torch.Tensor | None] = field(default_factory=list)

    def chosen(self, layer: int) -> torch.Tensor | None:
        return None if self.replay is None else self.replay[:, layer]

    def keep(self, layer: int, ids: torch.Tensor) -> None:
        if self.record:
            self.recorded[layer] = ids

    def routed_experts(self) -> torch.Tensor:
        """The last recorded forward's experts, int16 [T, MoE layers, k]."""
        if not self.recorded or any(r is None for r in self.recorded):
            raise RuntimeError("no routing was recorded; run a forward inside Routing.recording()")
        return torch.stack(self.recorded, dim=1).to(torch.int16)

    @contextlib.contextmanager
    def recording(self) -> Iterator[Routing]:
        self.record, self.recorded = True, [None] * self.num_layers
        try:
            yield self
        finally:
            self.record = False

    @contextlib.contextmanager
    def replaying(self, experts: torch.Tensor | None) -> Iterator[Routing]:
        """Route through `experts` [T, MoE layers, k] (None: the router's own choice) inside the block."""
        if experts is not None:
            want = (self.num_layers, self.top_k)
            if experts.dim() != 3 or tuple(experts.shape[1:]) != want:
                raise ValueError(f"routed_experts has shape {tuple(experts.shape)}, expected [tokens, {want[0]}, "
                                 f"{want[1]}] (tokens, MoE layers, experts per token)")
        self.replay = experts
        try:
            yield self
        finally:
            self.replay = None


class Experts(nn.Module):
    """E SwiGLU MLPs in the fused layout (parameter names as in HF's Qwen3MoeExperts)."""

    def __init__(self, cfg: ModelConfig, dtype, device):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype, device=device), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, h, i, dtype=dtype, device=device), requires_grad=False)


class SparseMoeBlock(nn.Module):
    """Router logits -> top-k experts (softmax, renormalised as HF does) -> the experts' weighted sum."""

    def __init__(self, cfg: ModelConfig, kernels: Kernels, dtype, device, routing: Routing, moe_index: int):
        from parity.models.decoder import Linear  # decoder.py imports this module

        super().__init__()
        self.kernels = kernels
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, False, kernels, dtype, device)
        self.experts = Experts(cfg, dtype, device)
        self.routing = routing
        self.moe_index = moe_index  # this block's position among the model's MoE layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        chosen = self.routing.chosen(self.moe_index)
        weights, ids = self.kernels.moe_route(logits, self.top_k, self.renormalize, chosen)
        self.routing.keep(self.moe_index, ids)
        return self.kernels.fused_moe(x, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
