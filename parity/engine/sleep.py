"""Sleep / wake: hand the engine's device memory to the trainer between rollouts (vLLM's sleep mode).

  level 1: weights are copied to host memory (pinned on CUDA) and their device storage released;
           the KV cache is freed. `wake_up()` copies the weights back.
  level 2: weights and KV cache are both released, nothing is kept. After `wake_up(["weights"])` the
           weight storage is back but uninitialised: call `update_weights()` before generating.
           vLLM's order for an update: wake weights, update, then wake the KV cache.

Weights return into the *same* Parameter tensors: their untyped storage is resized to 0 and back,
so every module keeps its references. The caching allocator usually hands back the same addresses
but does not promise it; `WakeStats.addresses_preserved` says whether it did. If the runner has
captured CUDA graphs and an address moved, the runner's `invalidate_cuda_graphs()` (if it has one) is
called so graphs are re-captured rather than replayed on stale pointers. RoPE tables (buffers, not
weights, absent from checkpoints) stay resident: they are small.

Freed memory is measured, not assumed: on CUDA `torch.cuda.memory_allocated` / `memory_reserved`
before and after (after `empty_cache()`, so the freed memory can reach another process too); on CPU,
the bytes of the released tensors minus the host copies still held.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from parity.engine.engine import Engine

WAKE_TAGS = ("weights", "kv_cache")


class EngineAsleepError(RuntimeError):
    """The engine's weights or KV cache are released; wake it (and reload discarded weights) first."""


@dataclass
class SleepState:
    level: int
    kv_cache_released: bool
    weights: str  # "offloaded" (host copy held), "discarded" (level 2) or "unloaded" (storage back, no values)
    params: list[torch.Tensor] = field(default_factory=list)  # released parameters (one per storage)
    host_copies: list[torch.Tensor] = field(default_factory=list)  # level 1: their values, on the host
    addresses: list[int] = field(default_factory=list)  # their device data pointers before sleep
    storage_bytes: list[int] = field(default_factory=list)  # their storage sizes


@dataclass
class MemorySnapshot:
    allocated: int | None  # torch.cuda.memory_allocated; None on CPU
    reserved: int | None  # torch.cuda.memory_reserved; None on CPU

    @classmethod
    def take(cls, device: torch.device) -> MemorySnapshot:
        if device.type != "cuda":
            return cls(None, None)
        torch.cuda.synchronize(device)
        return cls(torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device))


@dataclass
class SleepStats:
    level: int
    kv_cache_bytes: int  # size of the released KV cache
    weight_bytes: int  # size of the released weight storage
    host_bytes: int  # host memory now holding offloaded weights (level 1)
    freed_bytes: int  # device memory actually freed (CUDA: drop of memory_allocated)
    before: MemorySnapshot
    after: MemorySnapshot
    seconds: float

    @property
    def freed_reserved_bytes(self) -> int | None:
        if self.before.reserved is None:
            return None
        return self.before.reserved - self.after.reserved


@dataclass
class WakeStats:
    tags: tuple[str, ...]
    restored_bytes: int  # device bytes re-allocated (weights and/or KV cache)
    addresses_preserved: bool | None  # weights back at their old addresses (None: weights not woken)
    seconds: float


def _weight_tensors(engine: Engine) -> list[torch.Tensor]:
    """Every parameter with its own storage (tied weights appear once)."""
    seen: set[int] = set()
    out = []
    for p in engine.model.parameters():
        ptr = p.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            out.append(p)
    return out


def check_awake(engine: Engine) -> None:
    """Raise EngineAsleepError unless the engine can run a step."""
    state: SleepState | None = engine.sleep_state
    if state is None:
        return
    if state.weights == "unloaded":
        raise EngineAsleepError(
            "the weights were discarded by sleep(level=2); call update_weights() before generating"
        )
    raise EngineAsleepError(f"the engine is asleep (level {state.level}); call wake_up() before generating")


def check_weights_resident(engine: Engine) -> None:
    """Raise unless the weight storage is on the device (a weight update needs it)."""
    state: SleepState | None = engine.sleep_state
    if state is not None and state.weights in ("offloaded", "discarded"):
        raise EngineAsleepError(
            f"the weights are {state.weights} (sleep level {state.level}); call wake_up(tags=['weights']) first"
        )


def clear_discarded_weights(engine: Engine) -> None:
    """After a full weight update the values are valid again, whatever sleep left behind."""
    state: SleepState | None = engine.sleep_state
    if state is not None and state.weights == "unloaded":
        state.weights = "resident"
        if not state.kv_cache_released:
            engine.sleep_state = None


def sleep(engine: Engine, level: int = 1, empty_cache: bool = True) -> SleepStats:
    """Release the KV cache and offload (level 1) or discard (level 2) the weights."""
    if level not in (1, 2):
        raise ValueError(f"sleep level must be 1 (offload weights) or 2 (discard weights), got {level}")
    if engine.sleep_state is not None:
        raise EngineAsleepError(f"the engine is already asleep (level {engine.sleep_state.level}); wake_up() first")
    if engine.has_unfinished():
        raise RuntimeError("cannot sleep with requests in flight; finish or abort them first")
    device = engine.device
    start = time.perf_counter()
    before = MemorySnapshot.take(device)
    state = SleepState(level=level, kv_cache_released=True, weights="offloaded" if level == 1 else "discarded")

    kv_bytes = engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()
    engine.runner.free_kv_cache()
    engine.block_manager.reset_prefix_cache()  # cached blocks lose their contents

    weight_bytes = host_bytes = 0
    pin = device.type == "cuda"
    state.params = _weight_tensors(engine)
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
        torch.cuda.synchronize(device)  # the host copies must be complete before the storage goes
    for p in state.params:
        p.untyped_storage().resize_(0)
    engine.sleep_state = state

    if device.type == "cuda":
        if empty_cache:
            torch.cuda.empty_cache()
        after = MemorySnapshot.take(device)
        freed = before.allocated - after.allocated
    else:
        after = MemorySnapshot(None, None)
        freed = kv_bytes + weight_bytes - host_bytes  # host copies live in the same memory
    return SleepStats(level, kv_bytes, weight_bytes, host_bytes, freed, before, after, time.perf_counter() - start)


def wake_up(engine: Engine, tags: Iterable[str] | None = None) -> WakeStats:
    """Re-allocate what sleep released: `tags` is any of "weights", "kv_cache" (default both)."""
    tags = tuple(WAKE_TAGS if tags is None else tags)
    unknown = set(tags) - set(WAKE_TAGS)
    if unknown:
        raise ValueError(f"unknown wake_up tag(s) {sorted(unknown)}; expected any of {list(WAKE_TAGS)}")
    state: SleepState | None = engine.sleep_state
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
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)  # before the host copies are dropped
        preserved = [p.untyped_storage().data_ptr() for p in state.params] == state.addresses
        state.weights = "resident" if state.weights == "offloaded" else "unloaded"
        state.host_copies = []
    if "kv_cache" in tags and state.kv_cache_released:
        engine.runner.allocate_kv_cache()
        restored += engine.runner.kv_cache.numel() * engine.runner.kv_cache.element_size()
        state.kv_cache_released = False
    if preserved is False or "kv_cache" in tags:
        invalidate = getattr(engine.runner, "invalidate_cuda_graphs", None)
        if callable(invalidate):
            invalidate()
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    if state.weights == "resident" and not state.kv_cache_released:
        engine.sleep_state = None
    return WakeStats(tags, restored, preserved, time.perf_counter() - start)
