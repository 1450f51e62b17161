"""Where the GPU time of a rollout goes, fast vs deterministic mode: per-kernel CUDA time from torch.profiler.

Same workload shape as the mismatch benchmark's throughput part (Qwen3-0.6B shapes, random prompts
U[100, 1024], fixed output length, greedy, EOS ignored, CUDA graphs on), shortened so the trace stays small.
For each mode it prints the wall time, the summed kernel time (wall minus kernel time is host overhead and
gaps) and the kernels that take the most time, grouped by name.

  python -m benchmarks.kernel_profile --out DIR                 # on the GPU
  python -m benchmarks.kernel_profile --smoke --out /tmp/kp     # tiny model on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import run_env
from benchmarks.throughput import QWEN3_06B, SMOKE, Clock, decode_timing, random_prompts, run_parity
from parity import Engine
from parity.testing.factory import write_tiny_model


def kernel_table(prof, top: int) -> tuple[float, list[dict]]:
    """(total kernel seconds, the `top` kernel names by device time) from a finished profile."""
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if t > 0 and evt.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"name": evt.key[:90], "ms": t / 1e3, "calls": evt.count})
    rows.sort(key=lambda r: -r["ms"])
    return sum(r["ms"] for r in rows) / 1e3, rows[:top]


def profile_mode(path: Path, args, deterministic: bool, prompts) -> dict:
    engine = Engine.from_pretrained(path, device=args.device, dtype=args.dtype, deterministic=deterministic,
                                    max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    clock = Clock(torch.device(args.device))
    warm = prompts[:8]
    run_parity(engine, warm, [8] * len(warm), clock)  # compile + capture graphs outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        res = run_parity(engine, prompts, [args.output_len] * len(prompts), clock)
    kernel_s, top = kernel_table(prof, args.top)
    res.update(kernel_s=kernel_s, top_kernels=top)
    untraced = run_parity(engine, prompts, [args.output_len] * len(prompts), clock)
    res["seconds_untraced"] = untraced["seconds"]  # prompts now hit the prefix cache: mostly decode
    if args.device == "cuda":  # one decode step at batch 128, context ~800: whole engine step vs graph replay alone
        res["decode_step"] = decode_timing(engine, min(128, args.max_num_seqs), 800, 20, None, clock)
    del engine
    torch.cuda.empty_cache() if args.device == "cuda" else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    spec = SMOKE if args.smoke else QWEN3_06B
    args.max_model_len = 2048
    if args.smoke:
        args.num_prompts, args.output_len, args.max_model_len = 4, 4, 256
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp) / "model", spec)
        hi = 64 if args.smoke else 1024
        prompts = random_prompts(args.num_prompts, spec.padded_vocab_size, min(16, hi), hi, seed=0)
        results = {mode: profile_mode(path, args, det, prompts) for mode, det in (("fast", False), ("deterministic", True))}
    for mode, res in results.items():
        print(f"== {mode}: wall {res['seconds']:.3f} s (untraced {res['seconds_untraced']:.3f} s), "
              f"kernels {res['kernel_s']:.3f} s, {res['output_tok_s']:.0f} tok/s traced; decode step {res.get('decode_step')}")
        for row in res["top_kernels"]:
            print(f"  {row['ms']:9.2f} ms {row['calls']:7d}x  {row['name']}")
    (args.out / "kernel_profile.json").write_text(json.dumps({"env": run_env(args.device, args), **results}, indent=1))


if __name__ == "__main__":
    main()
