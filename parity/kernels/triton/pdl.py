"""Programmatic dependent launch (PDL): each kernel of a step is launched while the previous one still runs.

A batch-1 decode step is ~280 kernels of 2-8 us, each paying a launch and ramp-up after the previous one drains.
On Hopper and later a kernel launched with `launch_pdl=True` may start as soon as its predecessor has run
`gdc_launch_dependents`; it then blocks in `gdc_wait` until the predecessor has finished and its writes are
visible. `benchmarks/pdl_chain.py` measured 1.09 -> 0.72 us per kernel boundary in a CUDA graph (H200).

Every kernel of `parity.kernels.triton` calls `wait_for_previous()` before it touches memory, and every launch passes
`**LAUNCH`. The two go together: a kernel launched with PDL that read its inputs before `gdc_wait` would read them
before they are written. Waiting first keeps the order of every read and write exactly as without PDL; only the
launch overlaps (`gdc_wait` in a kernel launched without PDL returns at once).

LAUNCH is empty except inside `dependent_launches()`, which the engine wraps around the capture of its small-batch
decode graphs. Measured on the H200 (`tools/speed_device.sh pdl`, Qwen3-0.6B shapes, one process each): PDL for
every launch took the batch-1 graph from 1.27 to 1.20 ms and left batch 256's at 9.3 ms, but workload A (prefill
and decode at every batch size) fell from 25,343 to 24,176 tok/s (30,569 against 32,511 in a second round whose
prompts were prefix-cached); where that loss comes from was not measured.
Off under TRITON_INTERPRET (no inline assembly), before sm_90, and with PARITY_PDL=0.

Reads before the wait are allowed only of what no kernel of the step writes: the weights, the step's inputs (query
starts, sequence lengths, block tables, copied in before a graph replays) and earlier steps' keys. Deterministic
mode's few-row matmul and split decode, launched with PDL, use that window for L2 prefetches (`prefetch_rows`; a
`PREFETCH` constexpr from `bool(LAUNCH)`) of their weight rows or cached keys, which then stream while the previous
kernel finishes: its batch-1 decode 1.336 -> 1.286 ms per token on the H200 (`benchmarks/batch1_ab.py`, two runs
each). Fast mode's GEMV and decode attention measured slower with the same prefetches (1.029 -> 1.067 ms), and so
did a layer asking L2 for its o, gate_up and down weights during its attention (1.026 -> 1.108 ms at 0.6B,
4.81 -> 4.94 ms at 8B): they do not prefetch. A prefetch only moves data into L2 (the GPU's point of coherence) and
returns nothing, so it cannot change a result. Launched plainly, a kernel does not prefetch (it would only precede
its own loads); PARITY_PREFETCH=0 turns the prefetches off (to time them against none).

Fast mode instead loads into registers before the wait (`preloads()`): the GEMV its first one or two weight chunks,
the split RoPE decode its split's first key tile (the step's own key, which that kernel writes, is read back after
its store and patched in). The later code sums the preloaded chunks and tiles as the plain loop would, so the bits
are the plain launch's. The batch-1 step fell from 1.028 to 0.899-0.912 ms per token on the H200
(`benchmarks/batch1_ab.py`, PARITY_PRELOAD=1,0, two calls); PARITY_PRELOAD=0 turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["ENABLED", "LAUNCH", "dependent_launches", "prefetch_rows", "preloads", "wait_for_previous"]


def _supported() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or os.environ.get("PARITY_PDL", "1") == "0":
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


_ON = _supported()
ENABLED = tl.constexpr(_ON)
PREFETCH_ENABLED = tl.constexpr(_ON and os.environ.get("PARITY_PREFETCH", "1") != "0")
PRELOAD_ENABLED = _ON and os.environ.get("PARITY_PRELOAD", "1") != "0"
LAUNCH: dict = {}  # launch options for every kernel that waits; filled in place by `dependent_launches`


def preloads() -> bool:
    """Whether a kernel launched now loads its first read-only operands into registers before `wait_for_previous`
    (fast mode's GEMV: its first weight chunks; split decode: its first key tile): only under dependent launch,
    where that load overlaps the previous kernel. PARITY_PRELOAD=0 turns it off (to time it against none)."""
    return PRELOAD_ENABLED and bool(LAUNCH)


@contextmanager
def dependent_launches() -> Iterator[None]:
    """Kernels launched inside this block use PDL (where supported)."""
    saved = dict(LAUNCH)
    LAUNCH.update({"launch_pdl": True} if _ON else {})
    try:
        yield
    finally:
        LAUNCH.clear()
        LAUNCH.update(saved)


@triton.jit
def wait_for_previous():
    """Block until the previous kernel in the stream has finished, then let the next one launch."""
    if ENABLED:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_rows(row_ptrs, row_mask, length, SECTORS: tl.constexpr):
    """Hint L2 to fetch `length` elements from each pointer of the block `row_ptrs` (rows where `row_mask` is false
    are skipped): one `prefetch.global.L2` per 32-byte sector, SECTORS sectors of every row per step. Called before
    `wait_for_previous` on read-only data only (the module docstring says why that is safe)."""
    if PREFETCH_ENABLED:
        per_sector: tl.constexpr = 256 // row_ptrs.dtype.element_ty.primitive_bitwidth  # elements a sector
        offs = tl.arange(0, SECTORS) * per_sector
        for k0 in range(0, length, SECTORS * per_sector):
            k = k0 + offs
            mask = row_mask[:, None] & (k[None, :] < length)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [row_ptrs[:, None] + k[None, :], mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
                pack=1)
