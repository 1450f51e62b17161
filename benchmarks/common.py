"""The header every benchmark result carries: when, on what, with which versions, by which command."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch


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
        "command": "python " + " ".join(sys.argv),
    }
    if args is not None:
        env["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return env
