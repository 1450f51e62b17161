"""torch.distributed ranks for CPU tests: `run_ranks` spawns processes over gloo, joined through env:// like
torchrun does, runs a function in each and returns what each rank returned.

Not a test module (pytest collects test_*.py only); test modules import it as `from spawn_ranks import run_ranks`:
pytest (prepend import mode, no tests/__init__.py) puts tests/ on sys.path, and spawned ranks inherit the parent's
sys.path. `free_port` also serves single-process gloo groups.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parity.distributed.comm import init_distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(rank: int, world_size: int, port: int, fn, out_dir: Path, args: tuple) -> None:
    """What torchrun does for each rank, then run `fn(rank, *args)` and save its result."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    init_distributed()
    try:
        result = fn(rank, *args)
        # gloo's worker threads release a collective's Python-owned tensors after it completes; one still
        # doing so when the interpreter shuts down aborts the process (torch PR 179291). A final barrier
        # (no Python tensors) lets them finish first.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (out_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    # The barrier narrows that window but does not close it (seen once in ~20 clean runs); the result is
    # saved, so leave without interpreter shutdown, where the abort happens.
    os._exit(0)


def run_ranks(fn, world_size: int, out_dir: Path, *args) -> list:
    """Run `fn(rank, *args)` in `world_size` spawned ranks; each rank's result (pickled under out_dir)."""
    mp.spawn(_launch, args=(world_size, free_port(), fn, out_dir, args), nprocs=world_size, join=True)
    return [pickle.loads((out_dir / f"rank{r}.pkl").read_bytes()) for r in range(world_size)]
