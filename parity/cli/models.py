"""Which model a CLI command runs, said out loud: the installed real model by default, else the tiny one.

A GGUF file is dequantized once into an HF directory in parity's cache (`gguf.cached_hf_dir`, the
export `parity train` already uses) and loaded from there: reading and dequantizing the GGUF again
took most of `parity generate`'s run time. The exported weights are the float32 values the GGUF
loader would copy, so outputs are the same.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console


@dataclass(frozen=True)
class CliModel:
    name: str  # what to call it in messages and output files: the alias or path the user gave, or the default
    path: Path  # what the engine loads: an HF directory (a GGUF's cached export) or the path as given


def quiet_transformers() -> None:
    """No transformers deprecation or progress chatter in a CLI run: parity shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def set_cpu_threads(requested: int | None) -> int:
    """Set torch's CPU threads: `requested`, else the cores not already busy (from the load average), at
    least 1. OpenMP threads that share busy cores wait on each other: on 2 cores beside other jobs,
    `parity generate` ran 6x slower with 2 threads than with 1."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        threads = requested
    else:
        idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
        threads = max(1, min(torch.get_num_threads(), idle))
    torch.set_num_threads(threads)
    return threads


def pick_model(name: str | None, console: Console) -> CliModel:
    """`name` (an HF directory, a .gguf file or an alias), or by default SmolLM2-135M-Instruct when its
    package is installed, else the built-in tiny random model (with the install hint)."""
    from parity.models.aliases import DEFAULT_REAL_MODEL, MODEL_ALIASES, cache_root, is_installed
    from parity.models.loader import Checkpoint

    if name is None and not is_installed(DEFAULT_REAL_MODEL):
        from parity.testing.factory import default_model_dir

        path = default_model_dir()
        console.print(f"[yellow]using the tiny random model at {path} (its text is noise); for a real model: "
                      f"{MODEL_ALIASES[DEFAULT_REAL_MODEL].install_command}[/yellow]")
        return CliModel("tiny random model", path)
    name = name or DEFAULT_REAL_MODEL
    checkpoint = Checkpoint.resolve(name)
    if not checkpoint.is_gguf:
        return CliModel(name, checkpoint.path)
    start = time.perf_counter()
    with console.status(f"preparing {name}: dequantized weights are cached under {cache_root()} "
                        "(the first run writes them, about half a minute)"):
        path = checkpoint.hf_dir()
    took = time.perf_counter() - start
    if took > 2:
        console.print(f"dequantized {checkpoint.path.name} once into {path} ({took:.0f} s)")
    return CliModel(name, path)
