"""What the benchmark scripts share: the header every result carries, freeing memory between runs, and running
a worker process (a peer such as vLLM) so that nothing of it outlives its run.

Scripts run from the repository root as modules (`python -m benchmarks.throughput`), so they import
this module and each other as `benchmarks.*`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def proc_stats() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc (Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after "pid (comm)"
            yield int(stat.parent.name), state, int(ppid), int(pgrp)
        except (OSError, ValueError):
            continue


def live_group_members(pgid: int) -> list[int]:
    """Pids of process group `pgid` that have not exited (zombies, which hold no memory, left out)."""
    return [pid for pid, state, _, pgrp in proc_stats() if pgrp == pgid and state != "Z"]


def stop_process_group(pgid: int, wait_s: float = 60.0) -> str:
    """Kill what is left of a worker's session and wait until it is gone. Returns "" or a note for a status line."""
    left = live_group_members(pgid)
    if not left:
        return ""
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while live_group_members(pgid):
        if time.monotonic() > deadline:
            return f"; its leftover processes {left} still ran {wait_s:.0f} s after SIGKILL"
        time.sleep(0.2)
    return f"; its leftover processes {left} killed"


@dataclass(frozen=True)
class WorkerRun:
    returncode: int | None  # None: killed at the timeout
    output: str  # its stdout and stderr
    leftovers: str  # "" or a note on what of its session outlived it and was killed


def run_worker(argv: list[str], env: dict, timeout: float, log: Path, stdin: str = "", cwd: Path | None = None
               ) -> WorkerRun:
    """Run `argv` in a session of its own, its output in the file `log`, `stdin` written to it. Whatever of the
    session outlives the worker is killed before this returns: vLLM's engine-core process outlives its parent
    (by os._exit or a timeout) and keeps the GPU memory vLLM took, and would keep an output pipe open."""
    with log.open("w") as sink:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, text=True, start_new_session=True)
        proc.stdin.write(stdin)
        proc.stdin.close()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            leftovers = stop_process_group(proc.pid)
    return WorkerRun(code, log.read_text(errors="replace"), leftovers)


def timed(fn: Callable, add: Callable[[float], None], clock: Callable[[], float] = time.perf_counter) -> Callable:
    """`fn`, passing the seconds each call takes (by `clock`) to `add`, also when it raises."""
    def run(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            add(clock() - start)
    return run
