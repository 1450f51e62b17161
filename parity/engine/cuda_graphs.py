"""CUDA graphs for decode steps: one graph per batch size on a ladder (1, 2, 4, 8, 16, 32, then every 32
up to max_num_seqs), each replaying embedding -> layers -> LM head over static input buffers.

A decode batch of B sequences runs the smallest captured size >= B. Padding rows carry slot -1 (their
K/V are not written) and context length 0 (attention returns zeros for them), so they never touch
real sequences. Attention reads everything it needs from device tensors (`seq_lens`, `block_tables`),
and the split-KV count is fixed by `max_model_len`, so one graph serves every context length. Kernels
used under capture must not read the host lists of AttentionMetadata: they are placeholders here.

The model's inf/nan check (`check_finite`) cannot sync inside a graph, so each graph also writes a flag per
row, `finite`, that the runner reads after the replay (and re-runs the step eagerly to name the layer); per
row, so that a row whose result is dropped (a look-ahead step's row of a sequence that stopped) fails nobody.

Graphs hold raw pointers: weight updates must copy into the existing parameters (weight sync does),
and anything that reallocates the KV cache or the weights calls `ModelRunner.invalidate_cuda_graphs()`.
"""

from __future__ import annotations

import numpy as np
import torch

from parity.kernels.dispatch import dependent_launches
from parity.kernels.metadata import AttentionMetadata
from parity.models.decoder import DecoderModel

# Graphs of at most this many sequences launch their kernels with programmatic dependent launch: a step of 2-8 us
# kernels whose boundaries cost as much as their work (H200, Qwen3-0.6B shapes: the batch-1 graph 1.27 -> 1.20 ms;
# batch 256 unchanged at 9.3 ms). Sizes between were not measured one by one.
DEPENDENT_LAUNCH_MAX_BATCH = 16


def batch_size_ladder(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16) if b < max_batch_size]
    sizes += list(range(32, max_batch_size, 32))
    return sizes + [max_batch_size]


class DecodeGraphs:
    def __init__(self, model: DecoderModel, layer_caches, max_batch_size: int, max_model_len: int, block_size: int):
        self.model = model
        self.layer_caches = layer_caches
        self.sizes = batch_size_ladder(max_batch_size)
        self.max_model_len = max_model_len
        device = next(model.parameters()).device
        n, width = self.sizes[-1], -(-max_model_len // block_size)
        # Pinned host mirrors of the static device inputs: written by the host, copied before each replay.
        self.host_i64 = torch.zeros(3, n, dtype=torch.int64, pin_memory=True)  # token ids, positions, slots
        self.host_seq_lens = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self.host_tables = torch.zeros(n, width, dtype=torch.int32, pin_memory=True)
        self._row_owners: list[tuple[list[int] | None, int]] = [(None, 0)] * n  # see _write_tables
        self.i64 = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.i64[2].fill_(-1)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=device)
        self.finite = torch.ones(n, dtype=torch.bool, device=device)  # per row: the replayed step's hidden states were finite
        # Recorded after the host-to-device copies: the pinned mirrors are rewritten only once they have landed
        # (the previous step may still be queued when the host prepares the next one).
        self._copied = torch.cuda.Event()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.deterministic = model.kernels.deterministic  # the kernel set baked into the graphs
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[self.max_model_len] * bs,  # placeholder: the real lengths live on the device
            block_tables=self.block_tables[:bs],
            slot_mapping=self.i64[2, :bs],
        )

    def _forward(self, bs: int, meta: AttentionMetadata) -> None:
        hidden = self.model(self.i64[0, :bs], self.i64[1, :bs], meta, self.layer_caches)
        torch.all(torch.isfinite(hidden), dim=-1, out=self.finite[:bs])  # the model's own check cannot run in a graph
        self.logits[:bs] = self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            meta = self._meta(bs)
            self._forward(bs, meta)  # compiles the Triton kernels for this shape outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), dependent_launches(bs <= DEPENDENT_LAUNCH_MAX_BATCH):
                self._forward(bs, meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def _write_tables(self, block_tables: list[list[int]]) -> None:
        """Copy block tables into the pinned mirror, row by row, skipping what is already there.

        Block tables only grow by appends until the block manager replaces the list object (on free or
        preemption). Row i remembers the list object it last copied (a reference, so its identity cannot
        be reused) and how long it was: same object and length means same contents; same object, longer,
        means only the tail is new. At batch 256 this turns ~1 ms of list conversion per step into ~0.1 ms.
        """
        tables: np.ndarray = self.host_tables.numpy()
        owners = self._row_owners
        for i, table in enumerate(block_tables):
            owner, copied = owners[i]
            if owner is not table or copied > len(table):
                copied = 0
            if copied < len(table):
                tables[i, copied : len(table)] = table[copied:]
                owners[i] = (table, len(table))

    def padded_size(self, num_seqs: int) -> int | None:
        return next((b for b in self.sizes if b >= num_seqs), None)

    def run(self, token_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Replay the decode graph for these B sequences; float32 logits [B, V] (a view of a static buffer,
        valid until the next replay). `token_ids` may be a device tensor (the previous step's samples, not yet
        known to the host)."""
        num_seqs = len(positions)
        bs = self.padded_size(num_seqs)
        self._copied.synchronize()
        host = self.host_i64.numpy()
        if not isinstance(token_ids, torch.Tensor):
            host[0, :num_seqs] = token_ids
        host[1, :num_seqs] = positions
        host[2, :num_seqs] = slots
        host[:2, num_seqs:bs] = 0
        host[2, num_seqs:bs] = -1
        lens = self.host_seq_lens.numpy()
        lens[:num_seqs] = seq_lens
        lens[num_seqs:bs] = 0
        self._write_tables(block_tables)
        # Whole buffers (a few hundred KB): contiguous async copies; rows past bs are never read.
        self.i64.copy_(self.host_i64, non_blocking=True)
        self.seq_lens.copy_(self.host_seq_lens, non_blocking=True)
        self.block_tables.copy_(self.host_tables, non_blocking=True)
        self._copied.record()
        if isinstance(token_ids, torch.Tensor):
            self.i64[0, :num_seqs].copy_(token_ids)
        self.graphs[bs].replay()
        return self.logits[:num_seqs]
