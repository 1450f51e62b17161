"""Owns the model and its device memory: turns a ScheduledBatch into a forward pass and logits, sizes and
allocates the paged KV cache, releases and restores weights and KV cache for sleep mode, and copies new
weights into the existing parameters.

Sleep (vLLM's sleep mode): level 1 copies the weights to host memory (pinned on CUDA) and releases their
device storage; level 2 releases it without a copy (wake the weights, then load new ones). Weights return
into the *same* Parameter tensors: their untyped storage is resized to 0 and back, so every module keeps
its references. The caching allocator usually hands back the same addresses but does not promise it;
`WakeStats.addresses_preserved` says whether it did, and captured CUDA graphs are dropped when an address
moved or the KV cache was re-allocated. RoPE tables (buffers, absent from checkpoints) stay resident.
Freed memory is measured, not assumed: on CUDA `memory_allocated` / `memory_reserved` before and after
(after `empty_cache()`, so another process can use it); on CPU, the bytes released minus the host copies held.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from parity.engine.config import EngineConfig
from parity.engine.sampler import HostCopy, to_device
from parity.engine.scheduler import ScheduledBatch
from parity.engine.sleep import WAKE_TAGS, EngineAsleepError, MemorySnapshot, SleepState, SleepStats, WakeStats
from parity.engine.weight_sync import is_dtensor
from parity.kernels.metadata import AttentionMetadata
from parity.models.decoder import DecoderModel
from parity.models.weights import WeightMap
from parity.precision.policy import NonFiniteActivationError

logger = logging.getLogger(__name__)


@dataclass
class FlatBatch:
    """A scheduled batch flattened into one ragged batch of tokens, on the host."""

    tokens: list[int]
    positions: list[int]
    slots: list[int]
    starts: list[int]  # query start of each sequence, then the token count
    seq_lens: list[int]
    logits_rows: list[int]  # the rows that sample
    sampled_seqs: list[int]  # indices into batch.seqs of the sequences that sample this step
    # prompt_logprobs requests in prefill: (index into batch.seqs, first prompt token predicted, its hidden row, count)
    prompt_chunks: list[tuple[int, int, int, int]]


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [S] rows of the hidden states to sample from
    sampled_seqs: list[int]  # indices into batch.seqs of the S sequences that sample this step
    # prompt_logprobs requests in prefill: (index into batch.seqs, first prompt token predicted, its hidden row, count)
    prompt_chunks: list[tuple[int, int, int, int]]


@dataclass
class ForwardOutput:
    """A step's forward, queued on the device: float32 logits [S, V] of the S sequences that sample (None if
    none does; a decode graph's are a view of its static buffer, valid until the next replay), their indices
    into the batch, the prompt_logprobs hidden states, and a decode graph's inf/nan flag on its way to the
    host (None where the forward checked it itself), read once the step's results are needed."""

    logits: torch.Tensor | None
    sampled_seqs: list[int]
    prompt_hidden: list[PromptHidden]
    finite: HostCopy | None = None  # bool per row of the forward


@dataclass
class PromptHidden:
    """Final hidden states [len(targets), H] of a prefill chunk that predict the prompt tokens `targets`, which
    start at prompt position `start` of batch.seqs[seq_index] (for prompt_logprobs; the LM head runs on them
    in slices, so a long chunk never holds [chunk, V] logits)."""

    seq_index: int
    start: int
    targets: list[int]
    hidden: torch.Tensor


def kv_cache_bytes_per_block(model: DecoderModel, block_size: int) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=model.dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


@dataclass
class LoadStats:
    num_tensors: int  # source tensors copied (ignored buffers and tied aliases not counted)
    bytes_copied: int  # bytes written into the parameters (engine dtype)
    num_gathered: int  # DTensors gathered with full_tensor()


def _available_host_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    def __init__(self, model: DecoderModel, config: EngineConfig, max_model_len: int):
        self.model = model
        self.config = config
        self.device = next(model.parameters()).device
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.kv_cache: torch.Tensor | None = None
        self.graphs = None  # DecodeGraphs, when enable_cuda_graphs() was called
        self.prefill_graphs = None  # PrefillGraphs, likewise, for a model without MoE layers
        self._graph_config: tuple[int, int] | None = None
        self.sleep_state: SleepState | None = None
        self.num_blocks = self.num_kv_blocks()
        self.allocate_kv_cache()
        if self.device.type == "cuda" and not config.enforce_eager:
            self.enable_cuda_graphs(config.max_num_seqs, max_model_len)

    # ------------------------------------------------------------------------------- KV cache
    def num_kv_blocks(self) -> int:
        """Blocks the KV budget affords, capped at what max_num_seqs sequences of max_model_len could use."""
        per_block = kv_cache_bytes_per_block(self.model, self.block_size)
        if self.config.kv_cache_memory is not None:
            budget = self.config.kv_cache_memory
        elif self.device.type == "cuda":
            budget = self._cuda_kv_budget()
        else:
            budget = int(_available_host_memory() * self.config.memory_utilization)
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        num_blocks = min(budget // per_block, self.config.max_num_seqs * blocks_per_seq)
        if num_blocks < 1:
            raise MemoryError(
                f"KV-cache budget of {budget} bytes is below one block ({per_block} bytes); "
                "raise kv_cache_memory or memory_utilization"
            )
        return int(num_blocks)

    def _cuda_kv_budget(self) -> int:
        """What is left under memory_utilization after weights and the activations of a full-size step: twice, with
        prefill graphs (their memory pool holds a full-size step's, and an eager step needs its own)."""
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        lens = [min(self.max_model_len, num_tokens - i) for i in range(0, num_tokens, self.max_model_len)]
        with torch.inference_mode():
            ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
            hidden = self.model(ids, torch.cat([torch.arange(n, device=self.device) for n in lens]),
                                AttentionMetadata.for_packed_sequences(lens, self.device))
            self.model.compute_logits(hidden[-self.config.max_num_seqs:])
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        activations = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        torch.cuda.empty_cache()
        if not self.config.enforce_eager and self._prefill_graphs_allowed:
            activations *= 2
        return int(free - (1 - self.config.memory_utilization) * total - activations)

    def allocate_kv_cache(self) -> None:
        """One tensor [2, layers, blocks, block_size, kv_heads, head_dim]; layer i's K/V are views of it."""
        cfg = self.model.config
        self.kv_cache = torch.empty(
            2, cfg.num_layers, self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=self.model.dtype, device=self.device,
        )
        self.invalidate_cuda_graphs()

    def free_kv_cache(self) -> int:
        """Release the KV cache; return its size in bytes."""
        nbytes = self.kv_cache.numel() * self.kv_cache.element_size()
        self.kv_cache = None
        self.invalidate_cuda_graphs()
        return nbytes

    # ---------------------------------------------------------------------------- sleep / wake
    def check_awake(self) -> None:
        """Raise EngineAsleepError unless a step can run."""
        state = self.sleep_state
        if state is None:
            return
        if state.weights == "unloaded":
            raise EngineAsleepError(
                "the weights were discarded by sleep(level=2); call update_weights() before generating"
            )
        raise EngineAsleepError(f"the engine is asleep (level {state.level}); call wake_up() before generating")

    def check_weights_resident(self) -> None:
        """Raise unless the weight storage is on the device (a weight update needs it)."""
        state = self.sleep_state
        if state is not None and state.weights in ("offloaded", "discarded"):
            raise EngineAsleepError(
                f"the weights are {state.weights} (sleep level {state.level}); call wake_up(tags=['weights']) first"
            )

    def _weight_tensors(self) -> list[torch.Tensor]:
        """Every parameter with its own storage (tied weights appear once)."""
        seen: set[int] = set()
        out = []
        for p in self.model.parameters():
            ptr = p.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                out.append(p)
        return out

    def sleep(self, level: int, empty_cache: bool = True) -> SleepStats:
        """Free the KV cache and offload (level 1) or discard (level 2) the weights."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 (offload weights) or 2 (discard weights), got {level}")
        if self.sleep_state is not None:
            raise EngineAsleepError(f"the engine is already asleep (level {self.sleep_state.level}); wake_up() first")
        start = time.perf_counter()
        before = MemorySnapshot.take(self.device)
        state = SleepState(level=level, kv_cache_released=True, weights="offloaded" if level == 1 else "discarded")
        kv_bytes = self.free_kv_cache()
        weight_bytes = host_bytes = 0
        pin = self.device.type == "cuda"
        state.params = self._weight_tensors()
        for p in state.params:
            storage = p.untyped_storage()
            state.addresses.append(storage.data_ptr())
            state.storage_bytes.append(storage.nbytes())
            if level == 1:
                host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
                host.copy_(p.detach(), non_blocking=pin)
                state.host_copies.append(host)
                host_bytes += host.numel() * host.element_size()
            weight_bytes += storage.nbytes()
        if pin:
            torch.cuda.synchronize(self.device)  # the host copies must be complete before the storage goes
        for p in state.params:
            p.untyped_storage().resize_(0)
        self.sleep_state = state
        if self.device.type == "cuda":
            if empty_cache:
                torch.cuda.empty_cache()
            after = MemorySnapshot.take(self.device)
            freed = before.allocated - after.allocated
        else:
            after = MemorySnapshot(None, None)
            freed = kv_bytes + weight_bytes - host_bytes  # host copies live in the same memory
        return SleepStats(level, kv_bytes, weight_bytes, host_bytes, freed, before, after, time.perf_counter() - start)

    def wake_up(self, tags: Iterable[str] | None = None) -> WakeStats:
        """Re-allocate what sleep released: `tags` is any of "weights", "kv_cache" (default both)."""
        tags = tuple(WAKE_TAGS if tags is None else tags)
        unknown = set(tags) - set(WAKE_TAGS)
        if unknown:
            raise ValueError(f"unknown wake_up tag(s) {sorted(unknown)}; expected any of {list(WAKE_TAGS)}")
        state = self.sleep_state
        if state is None:
            raise EngineAsleepError("wake_up() on an engine that is not asleep")
        start = time.perf_counter()
        restored = 0
        preserved = None
        if "weights" in tags and state.weights in ("offloaded", "discarded"):
            for p, nbytes in zip(state.params, state.storage_bytes):
                p.untyped_storage().resize_(nbytes)
                restored += nbytes
            for p, host in zip(state.params, state.host_copies):
                p.detach().copy_(host, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # before the host copies are dropped
            preserved = [p.untyped_storage().data_ptr() for p in state.params] == state.addresses
            state.weights = "resident" if state.weights == "offloaded" else "unloaded"
            state.host_copies = []
            if not preserved:
                self.invalidate_cuda_graphs()
        if "kv_cache" in tags and state.kv_cache_released:
            self.allocate_kv_cache()
            restored += self.kv_cache.numel() * self.kv_cache.element_size()
            state.kv_cache_released = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if state.weights == "resident" and not state.kv_cache_released:
            self.sleep_state = None
        return WakeStats(tags, restored, preserved, time.perf_counter() - start)

    # ------------------------------------------------------------------------- weight loading
    def load_weights(self, weights: WeightMap, pairs: list[tuple[str, torch.Tensor]], complete: bool) -> LoadStats:
        """Copy validated HF-named tensors into the existing parameter storage (CUDA-graph pointers stay
        valid). `complete`: every weight was written, so weights discarded by sleep(level=2) are valid again."""
        num_tensors = num_gathered = bytes_copied = 0
        elem = torch.empty((), dtype=self.model.dtype).element_size()
        for name, tensor in pairs:
            if weights.normalize(name) is None:
                continue
            if is_dtensor(tensor):
                tensor = tensor.full_tensor()  # a collective: every rank iterates in the same order
                num_gathered += 1
            weights.copy(name, tensor.detach())
            num_tensors += 1
            bytes_copied += tensor.numel() * elem
            del tensor
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        state = self.sleep_state
        if complete and state is not None and state.weights == "unloaded":
            state.weights = "resident"
            if not state.kv_cache_released:
                self.sleep_state = None
        return LoadStats(num_tensors, bytes_copied, num_gathered)

    # ------------------------------------------------------------------------------ execution

    @property
    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(self.kv_cache.shape[1])]

    def enable_cuda_graphs(self, max_batch_size: int, max_model_len: int) -> None:
        """Capture decode graphs, and for a dense model prefill graphs, now (and again, lazily, after
        `invalidate_cuda_graphs`)."""
        self._graph_config = (max_batch_size, max_model_len)
        self._capture_graphs()
        if self._prefill_graphs_allowed:
            self._capture_prefill_graphs()

    def invalidate_cuda_graphs(self) -> None:
        """Drop captured graphs (the KV cache or weights moved); the next step that can use them captures anew."""
        self.graphs = self.prefill_graphs = None

    @property
    def _prefill_graphs_allowed(self) -> bool:
        """Steps that prefill run in graphs where decode steps do, for a dense model (a MoE block's routing is
        recorded and replayed on the eager path)."""
        return self.device.type == "cuda" and not self.model.config.moe_layers

    def _capture_graphs(self) -> None:
        from parity.engine.cuda_graphs import DecodeGraphs

        start = time.perf_counter()
        self.graphs = DecodeGraphs(self.model, self.layer_caches, *self._graph_config, self.block_size)
        # Logged: after every sleep/wake cycle (the KV cache is re-allocated) the next decode step captures again.
        logger.info("captured decode CUDA graphs for %d batch sizes (up to %d) in %.2f s", len(self.graphs.sizes),
                    self.graphs.sizes[-1], time.perf_counter() - start)

    def _capture_prefill_graphs(self) -> None:
        from parity.engine.cuda_graphs import PrefillGraphs

        start = time.perf_counter()
        max_num_seqs, max_model_len = self._graph_config
        self.prefill_graphs = PrefillGraphs(self.model, self.layer_caches, max_num_seqs,
                                            self.config.max_num_batched_tokens, max_model_len, self.block_size)
        logger.info("captured prefill CUDA graphs for %d token counts (up to %d) in %.2f s",
                    len(self.prefill_graphs.sizes), self.prefill_graphs.sizes[-1], time.perf_counter() - start)

    @staticmethod
    def _needs_eager(batch: ScheduledBatch) -> bool:
        """Whether the batch must run eagerly whatever graphs exist: prompt logits read the hidden states of prompt
        rows (a replay's are overwritten by the next), and the chosen experts are recorded on the eager path."""
        return any((s.params.prompt_logprobs is not None and s.in_prefill) or s.params.return_routed_experts
                   for s in batch.seqs)

    def _graphs_for(self, batch: ScheduledBatch):
        """The decode graphs, if they can run this batch (every sequence computes exactly one token)."""
        if any(n != 1 for n in batch.num_new_tokens) or self._needs_eager(batch):
            return None
        return self._decode_graphs(len(batch.seqs))

    def _prefill_graphs_for(self, batch: ScheduledBatch):
        """The prefill graphs, if they can run this batch (`_needs_eager`) and one is large enough."""
        if self._graph_config is None or not self._prefill_graphs_allowed or self._needs_eager(batch):
            return None
        if self.prefill_graphs is None or self.prefill_graphs.deterministic != self.model.kernels.deterministic:
            self._capture_prefill_graphs()
        if self.prefill_graphs.padded_size(sum(batch.num_new_tokens), len(batch.seqs)) is None:
            return None
        return self.prefill_graphs

    def _decode_graphs(self, num_seqs: int):
        """The decode graphs (captured at first use and after a switch of kernel mode), or None when there are
        none or they cannot take `num_seqs` sequences."""
        if self._graph_config is None or num_seqs > self._graph_config[0]:
            return None
        if self.graphs is None or self.graphs.deterministic != self.model.kernels.deterministic:
            self._capture_graphs()
        return self.graphs

    def flatten(self, batch: ScheduledBatch) -> FlatBatch:
        flat = FlatBatch([], [], [], [0], [], [], [], [])
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            begin = seq.num_computed_tokens
            end = begin + n
            num_prompt_rows = min(end, len(seq.prompt_ids) - 1) - begin  # rows that predict a later prompt token
            if seq.params.prompt_logprobs is not None and num_prompt_rows > 0:
                flat.prompt_chunks.append((i, begin + 1, flat.starts[-1], num_prompt_rows))
            flat.tokens.extend(_token_range(seq, begin, end))
            flat.positions.extend(range(begin, end))
            flat.slots.extend(_slots(seq.block_table, begin, end, bs))
            flat.starts.append(flat.starts[-1] + n)
            flat.seq_lens.append(end)
            if end == seq.num_tokens:  # every known token is in the cache: the next one is sampled
                flat.logits_rows.append(flat.starts[-1] - 1)
                flat.sampled_seqs.append(i)
        return flat

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        flat = self.flatten(batch)
        # two host-to-device copies: the int64 columns and the int32 ones, split into views on the device
        i64 = to_device(flat.tokens + flat.positions + flat.slots + flat.logits_rows, torch.int64, self.device)
        t = len(flat.tokens)
        meta = self._attention_metadata(batch.seqs, flat.starts, flat.seq_lens, max(batch.num_new_tokens),
                                        i64[2 * t : 3 * t])
        return StepInputs(
            input_ids=i64[:t],
            positions=i64[t : 2 * t],
            meta=meta,
            logits_rows=i64[3 * t :],
            sampled_seqs=flat.sampled_seqs,
            prompt_chunks=flat.prompt_chunks,
        )

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> ForwardOutput:
        """Queue one step: its logits for the sequences that sample, their indices, and the hidden states that
        predict prompt tokens of prompt_logprobs requests. Decode steps replay a CUDA graph when graphs are
        enabled."""
        graphs = self._graphs_for(batch)
        if graphs is not None:
            positions = [seq.num_computed_tokens for seq in batch.seqs]
            tokens = [_token_range(seq, p, p + 1)[0] for seq, p in zip(batch.seqs, positions)]
            out = self._execute_graph(graphs, batch.seqs, positions, tokens)
            sampled = [i for i, (seq, p) in enumerate(zip(batch.seqs, positions)) if p + 1 == seq.num_tokens]
            if len(sampled) < len(batch.seqs):
                out.sampled_seqs = sampled
                out.logits = out.logits[to_device(sampled, torch.int64, out.logits.device)] if sampled else None
            return out
        if (prefill_graphs := self._prefill_graphs_for(batch)) is not None:
            return self._execute_prefill_graph(prefill_graphs, batch)
        inputs = self.prepare(batch)
        if any(s.params.return_routed_experts for s in batch.seqs):
            with self.model.routing.recording() as routing:
                hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.layer_caches)
            _keep_routing(batch, inputs, routing.routed_experts().cpu())
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.layer_caches)
        prompt = self._prompt_hidden(batch, inputs, hidden) if inputs.prompt_chunks else []
        if not inputs.sampled_seqs:
            return ForwardOutput(None, [], prompt)
        return ForwardOutput(self.model.compute_logits(hidden[inputs.logits_rows]), inputs.sampled_seqs, prompt)

    @torch.inference_mode()
    def execute_decode(self, seqs: list, positions: list[int], token_ids: torch.Tensor) -> ForwardOutput:
        """Queue a decode step whose input tokens are still on the device (the previous step's samples, which
        the host has not read yet): sequence i computes `token_ids[i]` at `positions[i]` and samples the next
        token. Its slots must be allocated."""
        graphs = self._decode_graphs(len(seqs))
        if graphs is not None:
            return self._execute_graph(graphs, seqs, positions, token_ids)
        # one token per sequence at `positions`, its input already on the device
        i64 = to_device(positions + _decode_slots(seqs, positions, self.block_size), torch.int64, self.device)
        n = len(seqs)
        meta = self._attention_metadata(seqs, list(range(n + 1)), [p + 1 for p in positions], 1, i64[n:])
        hidden = self.model(token_ids, i64[:n], meta, self.layer_caches)
        return ForwardOutput(self.model.compute_logits(hidden), list(range(n)), [])

    def _attention_metadata(self, seqs: list, starts: list[int], seq_lens: list[int], max_query_len: int,
                            slot_mapping: torch.Tensor) -> AttentionMetadata:
        """The attention metadata of a step: query starts, sequence lengths and block tables in one int32
        host-to-device copy (views of it on the device), beside the slots already there."""
        tables = np.zeros((len(seqs), max(len(s.block_table) for s in seqs)), dtype=np.int32)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.block_table)] = seq.block_table
        i32 = _int32_columns(starts + seq_lens, tables, self.device)
        s = len(seq_lens)
        return AttentionMetadata(
            query_start_loc=i32[: s + 1],
            seq_lens=i32[s + 1 : 2 * s + 1],
            max_query_len=max_query_len,
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            block_tables=i32[2 * s + 1 :].view(tables.shape),
            slot_mapping=slot_mapping,
            single_token_seqs=any(b - a == 1 for a, b in zip(starts, starts[1:])),
        )

    @staticmethod
    def _prompt_hidden(batch: ScheduledBatch, inputs: StepInputs, hidden: torch.Tensor) -> list[PromptHidden]:
        return [
            PromptHidden(i, start, batch.seqs[i].prompt_ids[start : start + n], hidden[row : row + n])
            for i, start, row, n in inputs.prompt_chunks
        ]

    def _execute_graph(self, graphs, seqs: list, positions: list[int], token_ids) -> ForwardOutput:
        """Replay the decode graph: every sequence computes one token (a host list or a device tensor)."""
        logits = graphs.run(
            token_ids,
            positions,
            _decode_slots(seqs, positions, self.block_size),
            [p + 1 for p in positions],
            [seq.block_table for seq in seqs],
        )
        # the flag is overwritten by the next replay: its own copy goes to the host with the step's results
        finite = HostCopy(graphs.finite[: len(seqs)].clone()) if self.model.check_finite else None
        return ForwardOutput(logits, list(range(len(seqs))), [], finite)

    def _execute_prefill_graph(self, graphs, batch: ScheduledBatch) -> ForwardOutput:
        """Replay the graph that takes this step's tokens; the LM head runs on the rows that sample."""
        flat = self.flatten(batch)
        hidden, finite = graphs.run(flat.tokens, flat.positions, flat.slots, flat.starts, flat.seq_lens,
                                    [seq.block_table for seq in batch.seqs])
        finite = HostCopy(finite.clone()) if self.model.check_finite else None
        if not flat.sampled_seqs:
            return ForwardOutput(None, [], [], finite)
        rows = to_device(flat.logits_rows, torch.int64, self.device)
        return ForwardOutput(self.model.compute_logits(hidden[rows]), flat.sampled_seqs, [], finite)

    def raise_nonfinite(self, batch: ScheduledBatch) -> None:
        """A replayed step (decode or prefill graph) produced inf/nan: re-run it eagerly, whose check names the layer
        (re-running writes the same K/V into the same slots)."""
        inputs = self.prepare(batch)
        self.model(inputs.input_ids, inputs.positions, inputs.meta, self.layer_caches)
        raise NonFiniteActivationError("a CUDA-graph step produced inf/nan; the eager re-run did not")


def _int32_columns(values: list[int], tables: np.ndarray, device: torch.device) -> torch.Tensor:
    """`values` then the flattened block tables, int32, on `device` in one copy."""
    return to_device(torch.cat([torch.tensor(values, dtype=torch.int32), torch.from_numpy(tables).flatten()]),
                     torch.int32, device)


def _keep_routing(batch: ScheduledBatch, inputs: StepInputs, routed: torch.Tensor) -> None:
    """Each sequence that asked for it keeps its rows of the step's chosen experts, by first position
    (a recomputed chunk after preemption replaces the earlier one)."""
    starts = inputs.meta.query_start_loc_cpu
    for i, seq in enumerate(batch.seqs):
        if seq.params.return_routed_experts:
            seq.routed_experts[seq.num_computed_tokens] = routed[starts[i] : starts[i + 1]]


def _token_range(seq, begin: int, end: int) -> list[int]:
    """seq.token_ids[begin:end] without concatenating prompt and output (O(end - begin), not O(length))."""
    num_prompt = len(seq.prompt_ids)
    if begin >= num_prompt:
        return seq.output_ids[begin - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return seq.prompt_ids[begin:end]
    return seq.prompt_ids[begin:] + seq.output_ids[: end - num_prompt]


def _decode_slots(seqs: list, positions: list[int], block_size: int) -> list[int]:
    """The cache slot of each sequence's one token at its position (a decode step)."""
    return [seq.block_table[p // block_size] * block_size + p % block_size for seq, p in zip(seqs, positions)]


def _slots(block_table: list[int], begin: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of positions [begin, end)."""
    if end - begin == 1:
        return [block_table[begin // block_size] * block_size + begin % block_size]
    pos = np.arange(begin, end)
    return (np.asarray(block_table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size).tolist()
