"""parity's batch-1 latency under settings that only an environment variable switches (PARITY_PRELOAD, PARITY_PREFETCH,
PARITY_PDL),
measured as the peer benchmark measures it (one fresh 1024-token prompt, 512 greedy tokens: ms per token after the
first, and the TTFT): each setting in a fresh process on one written model, the settings in turn for `--rounds`
rounds, so that a same-call comparison sees the machine's drift in both. The profiler-traced step of
`benchmarks/step_speed.py` is no substitute under dependent launch: on 2026-12-03 it showed a 25% gain where this
measure, the same day, showed an 8% loss.

  python -m benchmarks.batch1_ab --out DIR --env PARITY_PREFETCH=1,0 --rounds 2      # on the GPU
  python -m benchmarks.batch1_ab --smoke --out /tmp/b1 --env PARITY_PREFETCH=1,0     # CPU: the script

Results: DIR/batch1_ab.json and a table of each setting's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.peer_vllm import prepare, spawn
from benchmarks.throughput import LONG_CONTEXT_SPECS, SMOKE


def run_order(values: list[str], rounds: int) -> list[str]:
    """The settings in turn, each round in the other direction from the one before (a drift up or down the call then
    falls on every setting alike)."""
    return [v for r in range(rounds) for v in (values if r % 2 == 0 else values[::-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--env", required=True, metavar="NAME=V1,V2,...", help="the variable and the values to compare")
    ap.add_argument("--spec", choices=sorted(LONG_CONTEXT_SPECS), default="qwen3-0.6b")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    args = ap.parse_args()
    name, _, values = args.env.partition("=")
    if not name or not values:
        ap.error(f"--env must be NAME=V1,V2,... (got {args.env!r})")
    values = values.split(",")
    if not all(values) or len(set(values)) != len(values):
        ap.error(f"--env values must be distinct and non-empty (got {values})")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1 (got {args.rounds})")
    spec, device, num_prompts = LONG_CONTEXT_SPECS[args.spec], "cuda", 256
    if args.smoke:
        spec, device, num_prompts, args.max_model_len = SMOKE, "cpu", 6, 128
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {v: [] for v in values}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        # the peer benchmark's model and prompts (its warm-up takes 64 of them), then only its latency rows
        env, common = prepare(tmp, spec, device, args.smoke, num_prompts, 1, None)
        job = {**common, "system": "parity", "mode": "deterministic" if args.deterministic else "fast",
               "max_model_len": args.max_model_len, "latency_only": True}
        for v in run_order(values, args.rounds):
            os.environ[name] = v  # what the spawned process inherits
            res = spawn(job, tmp, None, timeout=600)
            runs[v].append({k: res.get(k) for k in ("batch1_ms_per_token", "ttft_ms", "error", "wall_s")})
            print(f"{name}={v}", json.dumps(runs[v][-1])[-1500:], flush=True)
    lines = [f"| {name} | batch 1, ms per token (each run) | median | TTFT ms (median) |", "|---|---|---|---|"]
    for v, rs in runs.items():
        ms = [x["batch1_ms_per_token"] for x in rs if x["batch1_ms_per_token"] is not None]
        ttft = [x["ttft_ms"] for x in rs if x["ttft_ms"] is not None]
        lines.append(f"| {v} | {', '.join(f'{m:.3f}' for m in ms) or 'failed'} | "
                     f"{statistics.median(ms) if ms else float('nan'):.3f} | "
                     f"{statistics.median(ttft) if ttft else float('nan'):.1f} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "batch1_ab.json").write_text(json.dumps(
        {"env_name": name, "runs": runs, "spec": asdict(spec), "deterministic": args.deterministic,
         "max_model_len": args.max_model_len, "run_env": env, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "table": table}, indent=1))


if __name__ == "__main__":
    main()
