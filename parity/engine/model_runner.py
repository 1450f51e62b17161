"""Owns the model and its paged KV cache; turns a ScheduledBatch into a forward pass and logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from parity.engine.scheduler import ScheduledBatch
from parity.kernels.metadata import AttentionMetadata
from parity.models.decoder import DecoderModel
from parity.precision.policy import NonFiniteActivationError


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
        self.graphs = None  # DecodeGraphs, when enable_cuda_graphs() was called
        self._graph_config: tuple[int, int] | None = None
        self.allocate_kv_cache()

    def allocate_kv_cache(self) -> None:
        """One tensor [2, layers, blocks, block_size, kv_heads, head_dim]; layer i's K/V are views of it."""
        cfg = self.model.config
        self.kv_cache = torch.empty(
            2, cfg.num_layers, self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=self.model.dtype, device=self.device,
        )
        self.invalidate_cuda_graphs()

    def free_kv_cache(self) -> None:
        self.kv_cache = None
        self.invalidate_cuda_graphs()

    @property
    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(self.kv_cache.shape[1])]

    def enable_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        """Capture decode graphs now (and again, lazily, after `invalidate_cuda_graphs`)."""
        self._graph_config = (max_batch_size, max_model_len)
        self._capture_graphs()

    def invalidate_cuda_graphs(self) -> None:
        """Drop captured graphs (the KV cache or weights moved); the next decode step captures anew."""
        self.graphs = None

    def _capture_graphs(self) -> None:
        from parity.engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.layer_caches, *self._graph_config, self.block_size)

    def _graphs_for(self, batch: ScheduledBatch):
        """The decode graphs, if they can run this batch (every sequence computes exactly one token)."""
        if self._graph_config is None or len(batch.seqs) > self._graph_config[0]:
            return None
        if any(n != 1 for n in batch.num_new_tokens):
            return None
        if self.graphs is None or self.graphs.deterministic != self.model.kernels.deterministic:
            self._capture_graphs()
        return self.graphs

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
            tokens.extend(_token_range(seq, begin, end))
            positions.extend(range(begin, end))
            slots.extend(_slots(seq.block_table, begin, end, bs))
            starts.append(starts[-1] + n)
            seq_lens.append(end)
            if end == seq.num_tokens:  # every known token is in the cache: the next one is sampled
                logits_rows.append(starts[-1] - 1)
                sampled.append(i)
        tables = np.zeros((len(batch.seqs), max(len(s.block_table) for s in batch.seqs)), dtype=np.int32)
        for i, seq in enumerate(batch.seqs):
            tables[i, : len(seq.block_table)] = seq.block_table
        dev = self.device
        # two host-to-device copies: the int64 columns and the int32 ones, split into views on the device
        i64 = torch.tensor(tokens + positions + slots + logits_rows, dtype=torch.int64).to(dev, non_blocking=True)
        i32 = torch.cat([torch.tensor(starts + seq_lens, dtype=torch.int32), torch.from_numpy(tables).flatten()])
        i32 = i32.to(dev, non_blocking=True)
        t, s = len(tokens), len(seq_lens)
        meta = AttentionMetadata(
            query_start_loc=i32[: s + 1],
            seq_lens=i32[s + 1 : 2 * s + 1],
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            block_tables=i32[2 * s + 1 :].view(tables.shape),
            slot_mapping=i64[2 * t : 3 * t],
        )
        return StepInputs(
            input_ids=i64[:t],
            positions=i64[t : 2 * t],
            meta=meta,
            logits_rows=i64[3 * t :],
            sampled_seqs=sampled,
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        """Run one step; return float32 logits [S, V] for the sequences that sample, and their indices.

        Decode steps replay a CUDA graph when graphs are enabled; its logits are a view of a static
        buffer, valid until the next step."""
        graphs = self._graphs_for(batch)
        if graphs is not None:
            return self._execute_graph(graphs, batch)
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.layer_caches)
        if not inputs.sampled_seqs:
            return None, []
        return self.model.compute_logits(hidden[inputs.logits_rows]), inputs.sampled_seqs

    def _execute_graph(self, graphs, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        bs = self.block_size
        positions = [seq.num_computed_tokens for seq in batch.seqs]
        logits = graphs.run(
            [_token_range(seq, p, p + 1)[0] for seq, p in zip(batch.seqs, positions)],
            positions,
            [_slots(seq.block_table, p, p + 1, bs)[0] for seq, p in zip(batch.seqs, positions)],
            [p + 1 for p in positions],
            [seq.block_table for seq in batch.seqs],
        )
        if self.model.check_finite and not bool(graphs.finite):
            self._raise_nonfinite(batch)
        sampled = [i for i, (seq, p) in enumerate(zip(batch.seqs, positions)) if p + 1 == seq.num_tokens]
        if not sampled:
            return None, []
        if len(sampled) == len(batch.seqs):
            return logits, sampled
        return logits[torch.tensor(sampled, device=logits.device)], sampled

    def _raise_nonfinite(self, batch: ScheduledBatch) -> None:
        """A replayed decode step produced inf/nan: re-run it eagerly, whose check names the layer (re-running
        writes the same K/V into the same slots)."""
        inputs = self.prepare(batch)
        self.model(inputs.input_ids, inputs.positions, inputs.meta, self.layer_caches)
        raise NonFiniteActivationError("a decode step (CUDA graph) produced inf/nan; the eager re-run did not")


def _token_range(seq, begin: int, end: int) -> list[int]:
    """seq.token_ids[begin:end] without concatenating prompt and output (O(end - begin), not O(length))."""
    num_prompt = len(seq.prompt_ids)
    if begin >= num_prompt:
        return seq.output_ids[begin - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return seq.prompt_ids[begin:end]
    return seq.prompt_ids[begin:] + seq.output_ids[: end - num_prompt]


def _slots(block_table: list[int], begin: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of positions [begin, end)."""
    if end - begin == 1:
        return [block_table[begin // block_size] * block_size + begin % block_size]
    pos = np.arange(begin, end)
    return (np.asarray(block_table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size).tolist()
