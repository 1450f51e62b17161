"""Data-parallel colocated rollout: every trainer rank owns an engine on its own device.

All ranks call `generate` with the same prompts (SPMD, as a trainer's ranks do after a shared
sampler or a broadcast). Rank r generates a contiguous share of the prompts; a prompt's n samples
always stay on one rank, so GRPO groups are never split. The rollouts are gathered back
(`all_gather_object`) in the original prompt order, or each rank keeps its own share.

Results do not depend on the number of ranks: the sampler draws each sample's noise from its own
seed, and a prompt without a seed gets one here from (engine seed, call number, global prompt
index), where the engine alone would draw it from its request counter, which counts a rank's
share only. Weight sync stays local: each rank updates its own engine from its own trainer replica
(`dp.engine.update_weights(model)`); no weights cross ranks.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import replace

import torch.distributed as dist

from parity.distributed.comm import check_same_on_all_ranks, group_rank_and_size
from parity.engine.engine import Engine
from parity.engine.sampling_params import SamplingParams
from parity.engine.sequence import Rollout

_SEED_MASK = (1 << 62) - 1


def shard_bounds(num_prompts: int, world_size: int) -> list[int]:
    """Prompt index boundaries: rank r owns prompts [bounds[r], bounds[r + 1]) (sizes differ by at most one)."""
    return [num_prompts * r // world_size for r in range(world_size + 1)]


class DataParallelRollout:
    """One engine per rank of `group` (None = the whole job; without torch.distributed, a single rank)."""

    def __init__(self, engine: Engine, group: dist.ProcessGroup | None = None):
        self.engine = engine
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self._num_calls = 0

    def prompt_seed(self, call: int, prompt_index: int) -> int:
        """The request seed a seedless prompt gets: the same on every rank and for any world size."""
        return hash((self.engine.config.seed, call, prompt_index)) & _SEED_MASK

    def generate(
        self,
        prompts: Seq[str] | Seq[Seq[int]] | str,
        params: SamplingParams | Seq[SamplingParams] | None = None,
        gather: bool = True,
        use_tqdm: bool = False,
    ) -> list[Rollout]:
        """Rollouts ordered by prompt, then sample index, with global `prompt_index`es.

        gather=True: every rank returns all rollouts. gather=False: each rank returns only its own
        prompts' rollouts (e.g. to train on them where they are), skipping the gather.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.engine.encode(p) for p in prompts]
        params_list = list(params) if isinstance(params, Seq) else [params or SamplingParams()] * len(ids)
        if len(params_list) != len(ids):
            raise ValueError(f"{len(ids)} prompts but {len(params_list)} SamplingParams")
        call = self._num_calls
        self._num_calls += 1
        params_list = [
            p if p.seed is not None else replace(p, seed=self.prompt_seed(call, i)) for i, p in enumerate(params_list)
        ]
        if self.world_size > 1:
            check_same_on_all_ranks((ids, params_list), self.group, "data-parallel generate() arguments")

        bounds = shard_bounds(len(ids), self.world_size)
        start, end = bounds[self.rank], bounds[self.rank + 1]
        local = self.engine.generate(ids[start:end], params_list[start:end], use_tqdm=use_tqdm) if end > start else []
        local = [replace(r, prompt_index=start + r.prompt_index) for r in local]
        if not gather or self.world_size == 1:
            return local
        shards: list[list[Rollout] | None] = [None] * self.world_size
        dist.all_gather_object(shards, local, group=self.group)
        return sorted((r for shard in shards for r in shard), key=lambda r: (r.prompt_index, r.sample_index))
