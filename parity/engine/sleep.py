"""Sleep mode's public types: the state of released memory, what sleep() and wake_up() report, and the
error for using a sleeping engine. The tensor work lives in ModelRunner; the policy in Engine.

  level 1: weights are copied to host memory and their device storage released; the KV cache is freed.
  level 2: weights and KV cache are both released, nothing is kept. After `wake_up(["weights"])` the
           weight storage is back but uninitialised: call `update_weights()` before generating.
           vLLM's order for an update: wake weights, update, then wake the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
