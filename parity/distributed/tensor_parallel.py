"""Tensor parallelism (Megatron-style) for the shared decoder, for models larger than one GPU.

Each rank of the group holds a slice of every layer: `qkv_proj` (by heads) and `gate_up_proj` are
column-parallel and need no communication; `o_proj` and `down_proj` are row-parallel, summed by an
all-reduce (`RowParallelLinear`); the embedding and LM head hold ceil(V / tp) vocabulary rows each,
looked up by the owning rank and all-reduced, logits all-gathered. The model's `config` holds the
per-rank sizes (the runner, CUDA graphs and sleep size the KV cache from it), `full_config` the
checkpoint's. Every rank runs the same deterministic scheduler on identical gathered logits, so all
return the same rollouts. Plain `torch.distributed` collectives (NCCL on GPU, gloo on CPU); inference only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence as Seq
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parity.distributed.comm import check_same_on_all_ranks, rank_device
from parity.engine.config import EngineConfig
from parity.engine.engine import Engine
from parity.engine.model_runner import ModelRunner
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout
from parity.models.config import ModelConfig
from parity.models.decoder import DecoderModel, Linear
from parity.models.loader import Checkpoint, load
from parity.models.weights import WeightMap, build_weight_map
from parity.precision.policy import PrecisionPolicy


def local_config(cfg: ModelConfig, tp_size: int) -> ModelConfig:
    """The shapes one of `tp_size` ranks holds: 1/tp of the heads, KV heads, MLP width and (padded) vocabulary."""
    split = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads, "intermediate_size": cfg.intermediate_size}
    indivisible = [f"{name}={value}" for name, value in split.items() if value % tp_size]
    if indivisible:
        raise ValueError(
            f"tensor_parallel_size={tp_size} must divide {', '.join(indivisible)} of {cfg.architecture}; "
            "choose a tensor-parallel size that divides the number of KV heads"
        )
    local = {name: value // tp_size for name, value in split.items()}
    return replace(cfg, vocab_size=-(-cfg.vocab_size // tp_size), **local)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W_local^T) + b, over the input-feature shards of the group's ranks.

    Takes over an existing Linear's parameters, so their names (and the weight map's targets) stay.
    """

    def __init__(self, linear: Linear, group: dist.ProcessGroup | None):
        super().__init__()
        self.kernels = linear.kernels
        self.weight = linear.weight
        self.bias = linear.bias
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class TensorParallelDecoder(DecoderModel):
    """A DecoderModel holding this rank's shard; built at the local size, so no rank ever allocates the whole model."""

    def __init__(
        self, cfg: ModelConfig, policy: PrecisionPolicy, device, max_positions: int, group: dist.ProcessGroup | None = None
    ):
        if cfg.moe_layers:
            raise ValueError(f"tensor parallelism does not shard mixture-of-experts layers ({cfg.architecture}, "
                             f"MoE layers {list(cfg.moe_layers)}); run it with tensor_parallel_size=1")
        if not dist.is_initialized():
            raise RuntimeError("tensor parallelism needs torch.distributed: call init_distributed() under torchrun")
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        shard = local_config(cfg, size)
        super().__init__(shard, policy, device, max_positions)
        # What the model computes: local heads, KV heads and MLP width, but logits over the whole vocabulary.
        self.config = replace(shard, vocab_size=cfg.vocab_size)
        self.full_config = cfg
        self.group = group
        self.tp_rank, self.tp_size = rank, size
        self.vocab_rows = shard.vocab_size
        self.vocab_start = rank * shard.vocab_size
        for layer in self.layers:
            layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, group)
            layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, group)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.vocab_rows)
        x = F.embedding(local_ids.masked_fill(elsewhere, 0), self.embed_tokens)
        x = x.masked_fill(elsewhere[:, None], 0)
        dist.all_reduce(x, group=self.group)  # one owner per token, zeros elsewhere: the sum is exact
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = super().compute_logits(hidden)  # [S, V / tp] of this rank's vocabulary rows
        shards = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(shards, local, group=self.group)
        return torch.cat(shards, dim=-1)[:, : self.full_config.vocab_size]


class ShardedWeightMap(WeightMap):
    """Validates the trainer's full (HF-shaped) tensors like WeightMap, then copies only this rank's slice.

    The slice is found by comparing the full and the local weight maps: the one dimension whose size
    differs is the split one (rows for column-parallel and vocab tensors, columns for row-parallel),
    and a tensor whose shapes agree (norms, row-parallel biases) is copied whole.
    """

    def __init__(self, model: TensorParallelDecoder):
        super().__init__(model, model.full_config)
        self.local_targets = build_weight_map(local_config(model.full_config, model.tp_size))
        self.rank = model.tp_rank

    @torch.no_grad()
    def copy(self, name: str, tensor: torch.Tensor) -> None:
        name = self.normalize(name)
        if name is None:
            return
        full, local = self.targets[name], self.local_targets[name]
        dest = self.params[local.param].data
        if local.rows is not None:
            dest = dest[local.rows[0] : local.rows[1]]
        dim = next((d for d, (a, b) in enumerate(zip(full.shape, local.shape)) if a != b), None)
        if dim is not None:
            size = local.shape[dim]
            start = min(self.rank * size, full.shape[dim])
            tensor = tensor.narrow(dim, start, min(size, full.shape[dim] - start))
            if tensor.shape[dim] < size:  # the vocabulary's padding rows on the last rank
                dest.narrow(dim, tensor.shape[dim], size - tensor.shape[dim]).zero_()
                dest = dest.narrow(dim, 0, tensor.shape[dim])
        dest.copy_(tensor.to(device=dest.device, dtype=dest.dtype))


class TPModelRunner(ModelRunner):
    def num_kv_blocks(self) -> int:
        """The smallest count any rank can afford: the ranks' block managers must stay identical."""
        blocks = torch.tensor([super().num_kv_blocks()], device=self.device)
        dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=self.model.group)
        return int(blocks.item())


class TPEngine(Engine):
    """An Engine over a TensorParallelDecoder. Every rank of the group runs it in lockstep (SPMD) and
    returns the same rollouts; `update_weights` takes the trainer's full tensors on every rank."""

    model: TensorParallelDecoder
    runner_class = TPModelRunner

    def __init__(self, model: TensorParallelDecoder, tokenizer, config: EngineConfig, max_model_len: int):
        super().__init__(model, tokenizer, config, max_model_len)
        self.model_config = model.full_config
        self.weights = ShardedWeightMap(model)

    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]] | str,
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Rollout]:
        check_same_on_all_ranks((prompts, params), self.model.group, "generate() arguments")
        return super().generate(prompts, params, use_tqdm=use_tqdm and self.model.tp_rank == 0)

    @classmethod
    def from_pretrained(cls, path: str | Path, group: dist.ProcessGroup | None = None, **kwargs) -> TPEngine:
        """Load an HF-format model directory split over `group` (None = every rank of the job).
        Keyword arguments are EngineConfig fields; the device defaults to `cuda:LOCAL_RANK`. CUDA graphs
        are off unless `enforce_eager=False` is passed: capturing NCCL collectives is not verified yet."""
        config = EngineConfig(**{"enforce_eager": True, **kwargs})
        checkpoint = Checkpoint.resolve(path)
        device = torch.device(config.device) if config.device is not None else rank_device()
        loaded = load(
            checkpoint, config.precision_policy(device, checkpoint.config), device, config.max_model_len,
            build=functools.partial(TensorParallelDecoder, group=group), weight_map=ShardedWeightMap,
        )
        return cls(loaded.model, loaded.tokenizer, config, loaded.max_positions)
