"""Owns the model and its paged KV cache; turns a ScheduledBatch into a forward pass and logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parity.kernels.metadata import AttentionMetadata
from parity.rollout.models.decoder import DecoderModel
from parity.rollout.scheduler import ScheduledBatch


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [S] rows of the hidden states to sample from
    sampled_seqs: list[int]  # indices into batch.seqs of the S sequences that sample this step


def kv_cache_bytes_per_block(model: DecoderModel, block_size: int) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=model.dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, device: torch.device):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_cache: torch.Tensor | None = None
        self.allocate_kv_cache()

    def allocate_kv_cache(self) -> None:
        """One tensor [2, layers, blocks, block_size, kv_heads, head_dim]; layer i's K/V are views of it."""
        cfg = self.model.config
        self.kv_cache = torch.empty(
            2, cfg.num_layers, self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=self.model.dtype, device=self.device,
        )

    def free_kv_cache(self) -> None:
        self.kv_cache = None

    @property
    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(self.kv_cache.shape[1])]

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        sampled: list[int] = []
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            begin = seq.num_computed_tokens
            end = begin + n
            tokens.extend(seq.token_ids[begin:end])
            positions.extend(range(begin, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, end))
            starts.append(starts[-1] + n)
            seq_lens.append(end)
            if end == seq.num_tokens:  # every known token is in the cache: the next one is sampled
                logits_rows.append(starts[-1] - 1)
                sampled.append(i)
        max_blocks = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in batch.seqs]
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        )
        return StepInputs(
            input_ids=torch.tensor(tokens, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            meta=meta,
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=dev),
            sampled_seqs=sampled,
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        """Run one step; return float32 logits [S, V] for the sequences that sample, and their indices."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.layer_caches)
        if not inputs.sampled_seqs:
            return None, []
        return self.model.compute_logits(hidden[inputs.logits_rows]), inputs.sampled_seqs
