"""CUDA graphs for the model's forward: decode steps (`DecodeGraphs`: one graph per batch size on a ladder (1, 2,
4, 8, 16, 32, then every 32 up to max_num_seqs), embedding -> layers -> LM head) and steps that prefill
(`PrefillGraphs`: one graph per token count on a ladder up to max_num_batched_tokens, embedding -> layers; the LM
head runs after the replay on the rows that sample). An eager forward costs ~15-20 ms of host time at any size
(~400 launches from Python); a prefill step of 8192 tokens is ~15 ms of kernels, so eager, it waits on the host.

A step runs the smallest captured size >= its own. Padding tokens carry slot -1 (their K/V are not written);
padding sequences have context length 0 and own no query token (decode: the padding token), so attention gives
them nothing and they never touch real sequences. Attention reads everything it needs from device tensors
(`query_start_loc`, `seq_lens`, `block_tables`), and the split-KV count is fixed by `max_model_len`, so one graph
serves every context length. Kernels used under capture must not read the host lists of AttentionMetadata: they
are placeholders here.

The model's inf/nan check (`check_finite`) cannot sync inside a graph, so each graph also writes a flag per
row, `finite`, that the runner reads after the replay (and re-runs the step eagerly to name the layer); per
row, so that a row whose result is dropped (a look-ahead step's row of a sequence that stopped, a padding token)
fails nobody.

Graphs hold raw pointers: weight updates must copy into the existing parameters (weight sync does),
and anything that reallocates the KV cache or the weights calls `ModelRunner.invalidate_cuda_graphs()`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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


def token_count_ladder(max_tokens: int) -> list[int]:
    """Every 64 tokens up to 512, every 128 up to 1024, every 256 up to 2048, then every 512, and max_tokens: a step
    pads its tokens by at most 64 up to 512 and by at most 25% past it."""
    sizes = [t for lo, hi, step in ((64, 512, 64), (640, 1024, 128), (1280, 2048, 256), (2560, max_tokens, 512))
             for t in range(lo, min(hi, max_tokens - 1) + 1, step)]
    return sizes + [max_tokens]


def capture_graphs(sizes: list[int], step_for: Callable[[int], Callable[[], None]],
                   dependent_launch_max: int = 0) -> dict[int, torch.cuda.CUDAGraph]:
    """One graph per size, largest first, so smaller graphs reuse its memory pool. `step_for(size)` sets up the
    size's inputs and returns the forward to capture, which runs once uncaptured first (Triton compiles its kernels
    for the shape outside the capture). Sizes up to `dependent_launch_max` capture with programmatic dependent launch."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    pool = None
    for size in reversed(sizes):
        step = step_for(size)
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool), dependent_launches(size <= dependent_launch_max):
            step()
        pool = graph.pool() if pool is None else pool
        graphs[size] = graph
    torch.cuda.synchronize()
    return graphs


class StaticInputs:
    """A graph set's static device inputs and their pinned host mirrors, written by the host and copied before each
    replay: token ids, positions and slots [3, T]; query starts and sequence lengths [S + 1 | S]; block tables
    [S, W]. Rows past a step's padded size are never read."""

    def __init__(self, num_tokens: int, num_seqs: int, width: int, device: torch.device):
        self.num_seqs = num_seqs
        self.host_i64 = torch.zeros(3, num_tokens, dtype=torch.int64, pin_memory=True)
        self.host_i32 = torch.zeros(2 * num_seqs + 1, dtype=torch.int32, pin_memory=True)
        self.host_tables = torch.zeros(num_seqs, width, dtype=torch.int32, pin_memory=True)
        self._row_owners: list[tuple[list[int] | None, int]] = [(None, 0)] * num_seqs  # see _write_tables
        self.i64 = torch.zeros(3, num_tokens, dtype=torch.int64, device=device)
        self.i64[2].fill_(-1)
        self.i32 = torch.zeros(2 * num_seqs + 1, dtype=torch.int32, device=device)
        self.query_start_loc, self.seq_lens = self.i32[: num_seqs + 1], self.i32[num_seqs + 1 :]
        self.block_tables = torch.zeros(num_seqs, width, dtype=torch.int32, device=device)
        # Recorded after the host-to-device copies: the pinned mirrors are rewritten only once they have landed
        # (the previous step may still be queued when the host prepares the next one).
        self._copied = torch.cuda.Event()

    def meta(self, num_tokens: int, num_seqs: int, max_query_len: int, max_model_len: int,
             query_starts: list[int]) -> AttentionMetadata:
        """The metadata a graph of `num_tokens` tokens and `num_seqs` sequences is captured with. Its host lists are
        placeholders (the real ones live on the device) that no kernel under capture reads, except that
        deterministic attention skips zero-filling its output where the host query starts end at the token count
        (every row has a sequence: a decode graph's padding sequences own a token each), so `query_starts` says
        whether they do."""
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            max_query_len=max_query_len,
            max_seq_len=max_model_len,
            query_start_loc_cpu=query_starts,
            seq_lens_cpu=[max_model_len] * num_seqs,
            block_tables=self.block_tables[:num_seqs],
            slot_mapping=self.i64[2, :num_tokens],
        )

    def write(self, token_ids: list[int] | None, positions: list[int], slots: list[int], num_tokens: int,
              query_starts: list[int], seq_lens: list[int], block_tables: list[list[int]]) -> None:
        """Copy one step's inputs, padded to `num_tokens` tokens and `len(query_starts) - 1` sequences (the caller
        pads the query starts; sequences past `seq_lens` get length 0), to the device. `token_ids` None: the caller
        writes them into `i64[0]` on the device."""
        self._copied.synchronize()
        n, s, bs = len(positions), len(seq_lens), len(query_starts) - 1
        host = self.host_i64.numpy()
        if token_ids is not None:
            host[0, :n] = token_ids
        host[1, :n] = positions
        host[2, :n] = slots
        host[:2, n:num_tokens] = 0
        host[2, n:num_tokens] = -1
        i32 = self.host_i32.numpy()
        i32[: bs + 1] = query_starts
        lens = i32[self.num_seqs + 1 :]
        lens[:s] = seq_lens
        lens[s:bs] = 0
        self._write_tables(block_tables)
        # Contiguous async copies: the whole token and length buffers (a few KB to ~200 KB), the block tables' rows
        # of the step's sequences only (a padding sequence's row is never read; the whole [S, W] buffer is 512 KB at
        # 256 sequences x 8192 / 16 blocks, and the three copies took 16.6 us of a batch-1 step's trace with it).
        self.i64.copy_(self.host_i64, non_blocking=True)
        self.i32.copy_(self.host_i32, non_blocking=True)
        self.block_tables[:s].copy_(self.host_tables[:s], non_blocking=True)
        self._copied.record()

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


class DecodeGraphs:
    def __init__(self, model: DecoderModel, layer_caches, max_batch_size: int, max_model_len: int, block_size: int):
        self.model = model
        self.layer_caches = layer_caches
        self.sizes = batch_size_ladder(max_batch_size)
        self.max_model_len = max_model_len
        device = next(model.parameters()).device
        n = self.sizes[-1]
        self.inputs = StaticInputs(n, n, -(-max_model_len // block_size), device)
        self.logits = torch.empty(n, model.config.vocab_size, dtype=torch.float32, device=device)
        self.finite = torch.ones(n, dtype=torch.bool, device=device)  # per row: the replayed step's hidden states were finite
        self.deterministic = model.kernels.deterministic  # the kernel set baked into the graphs
        self._capture()

    def _forward(self, bs: int, meta: AttentionMetadata) -> None:
        ids, positions = self.inputs.i64[0, :bs], self.inputs.i64[1, :bs]
        hidden = self.model(ids, positions, meta, self.layer_caches)
        torch.all(torch.isfinite(hidden), dim=-1, out=self.finite[:bs])  # the model's own check cannot run in a graph
        self.logits[:bs] = self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        self.inputs.query_start_loc.copy_(torch.arange(self.sizes[-1] + 1))  # the padding sequences own a token each

        def step(bs: int) -> Callable[[], None]:
            return functools.partial(self._forward, bs, self.inputs.meta(bs, bs, 1, self.max_model_len,
                                                                         list(range(bs + 1))))

        self.graphs = capture_graphs(self.sizes, step, DEPENDENT_LAUNCH_MAX_BATCH)

    def padded_size(self, num_seqs: int) -> int | None:
        return next((b for b in self.sizes if b >= num_seqs), None)

    def run(self, token_ids: list[int] | torch.Tensor, positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Replay the decode graph for these B sequences; float32 logits [B, V] (a view of a static buffer,
        valid until the next replay). `token_ids` may be a device tensor (the previous step's samples, not yet
        known to the host)."""
        num_seqs = len(positions)
        bs = self.padded_size(num_seqs)
        on_device = isinstance(token_ids, torch.Tensor)
        self.inputs.write(None if on_device else token_ids, positions, slots, bs, range(bs + 1), seq_lens,
                          block_tables)
        if on_device:
            self.inputs.i64[0, :num_seqs].copy_(token_ids)
        self.graphs[bs].replay()
        return self.logits[:num_seqs]


class PrefillGraphs:
    """Graphs for steps whose sequences compute any number of tokens (prefill chunks, with decode rows beside
    them), up to `max_tokens` tokens and `max_num_seqs` sequences: embedding -> layers -> final norm into a static
    hidden-state buffer. The LM head runs after the replay on the rows that sample (a step samples far fewer rows
    than it computes)."""

    def __init__(self, model: DecoderModel, layer_caches, max_num_seqs: int, max_tokens: int, max_model_len: int,
                 block_size: int):
        self.model = model
        self.layer_caches = layer_caches
        self.sizes = token_count_ladder(max_tokens)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        device = next(model.parameters()).device
        n = self.sizes[-1]
        self.inputs = StaticInputs(n, min(max_num_seqs, n), -(-max_model_len // block_size), device)
        self.hidden = torch.empty(n, model.config.hidden_size, dtype=model.dtype, device=device)
        self.finite = torch.ones(n, dtype=torch.bool, device=device)
        self.deterministic = model.kernels.deterministic
        self.replays = 0  # steps run in these graphs
        self._capture()

    def _num_seqs(self, num_tokens: int) -> int:
        """The sequences a graph of `num_tokens` tokens takes (each computes at least one token)."""
        return min(self.max_num_seqs, num_tokens)

    def _forward(self, t: int, meta: AttentionMetadata) -> None:
        hidden = self.model(self.inputs.i64[0, :t], self.inputs.i64[1, :t], meta, self.layer_caches)
        torch.all(torch.isfinite(hidden), dim=-1, out=self.finite[:t])
        self.hidden[:t].copy_(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        def step(t: int) -> Callable[[], None]:
            s = self._num_seqs(t)
            # Every token in one sequence (the warm-up forward then attends causally over real slots' K/V: slot -1
            # writes nothing, so the cache keeps whatever it holds).
            self.inputs.query_start_loc[: s + 1].fill_(t)
            self.inputs.query_start_loc[0] = 0
            meta = self.inputs.meta(t, s, t, self.max_model_len, [0] * (s + 1))  # padding tokens have no sequence
            return functools.partial(self._forward, t, meta)

        self.graphs = capture_graphs(self.sizes, step)

    def padded_size(self, num_tokens: int, num_seqs: int) -> int | None:
        """The graph for a step of these sizes, or None where none is large enough."""
        if num_seqs > self.max_num_seqs:
            return None
        return next((t for t in self.sizes if t >= num_tokens and self._num_seqs(t) >= num_seqs), None)

    def run(self, token_ids: list[int], positions: list[int], slots: list[int], query_starts: list[int],
            seq_lens: list[int], block_tables: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph for this step (`query_starts`: its sequences' query starts, then the token count): its
        final hidden states [T, H] and per-token finite flags [T], views of static buffers valid until the next
        replay."""
        num_tokens = len(positions)
        t = self.padded_size(num_tokens, len(seq_lens))
        pad = [num_tokens] * (self._num_seqs(t) - len(seq_lens))  # padding sequences own no token
        self.inputs.write(token_ids, positions, slots, t, query_starts + pad, seq_lens, block_tables)
        self.graphs[t].replay()
        self.replays += 1
        return self.hidden[:num_tokens], self.finite[:num_tokens]
