"""Joining the job that `torchrun` / `accelerate launch` started, and checks every parallel entry needs.

Both launchers describe the job in environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so one `env://` initialisation serves both. A process group that already exists (made
by `accelerate.Accelerator()` or the trainer itself) is reused, never replaced.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rank_device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the launcher's process group (NCCL on GPU, gloo on CPU) unless one exists; return this rank's device."""
    device = rank_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [v for v in _LAUNCH_VARS if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"no torch.distributed job to join: {', '.join(missing)} not set; "
                "start the script with `torchrun --nproc-per-node N` or `accelerate launch --multi_gpu --num_processes N`"
            )
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"), init_method="env://")
    return device


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) within `group` (None = the whole job); (0, 1) when torch.distributed is not running."""
    if not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_same_on_all_ranks(value: object, group: dist.ProcessGroup | None, what: str) -> None:
    """Raise on every rank unless `value` (compared by its repr) is the same on all ranks of `group`.

    Parallel generation is SPMD: every rank must pass the same request, or ranks would silently work
    on different batches (data parallel) or run different schedules and deadlock (tensor parallel).
    """
    digest = hashlib.sha256(repr(value).encode()).hexdigest()
    digests: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(
            f"{what} differ between ranks: rank(s) {differ} disagree with rank 0 of the group; "
            "every rank must pass the same prompts and sampling parameters"
        )
