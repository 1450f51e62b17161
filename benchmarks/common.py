"""What the benchmark scripts share: the header every result carries, and freeing memory between runs.

Scripts run from the repository root as modules (`python -m benchmarks.throughput`), so they import
this module and each other as `benchmarks.*`.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from pathlib import Path

import torch


def _invocation() -> list[str]:
    """How the running script was started: `-m benchmarks.x` for a module, else its path."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return ["-m", spec.name] if spec is not None else sys.argv[:1]


def run_env(device: torch.device | str, args: argparse.Namespace | None = None) -> dict:
    """date, device (the GPU's name, else the CPU's), torch and transformers versions, the command line, and
    the parsed arguments (paths as strings) if given."""
    import transformers

    device = torch.device(device)
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(["python", *_invocation(), *sys.argv[1:]]),
    }
    if args is not None:
        env["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return env


def free_memory(device: torch.device | str) -> None:
    """Collect garbage and hand cached CUDA blocks back, so the next engine or model starts from a clean pool."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def workload_parser(doc: str, smoke_help: str, num_prompts: int = 256, output_len: int = 512) -> argparse.ArgumentParser:
    """The options of a benchmark on the throughput workload: --out, --smoke, --num-prompts, --output-len."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--num-prompts", type=int, default=num_prompts)
    ap.add_argument("--output-len", type=int, default=output_len)
    return ap
