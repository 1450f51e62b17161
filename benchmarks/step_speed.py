"""What an engine step costs at small and large batch, and what async scheduling (parity.engine.step_pipeline)
buys, one engine, one process.

Qwen3-0.6B shapes (`--spec qwen3-8b`: Qwen3-8B's; random init, bf16, HF format), fast mode (`--deterministic`:
the batch-invariant one), max_model_len 8192. With async scheduling off, then on (same engine: same KV pool, same
compiled kernels; the order alternates per round, so drift within the process shows): workload A (256 prompts
U[100, 1024], 512 greedy tokens, EOS ignored) and B (output lengths U[100, 1024], temperature 0.6) output tok/s,
batch-1 ms per token (256 tokens after a 100-1024-token prompt), and decode steps at batch 1 and 256 at context
1024 (whole engine step against the CUDA graph's replay alone). Then the kernels of a decode step by name at each
of --kernel-batches (default: batch 1; torch.profiler sees inside graphs).

  python -m benchmarks.step_speed --out $OUT            # on the GPU: about 100 s on an H200
  python -m benchmarks.step_speed --out $OUT --deterministic --rounds 0   # deterministic mode's batch-1 kernels
  python -m benchmarks.step_speed --out $OUT --spec qwen3-8b --rounds 0 --kernel-batches 1 256   # 8B's kernels
  python -m benchmarks.step_speed --out $OUT --rounds 0 --ttft   # and one uncached prefill's kernels and host calls
  python -m benchmarks.step_speed --out $OUT --rounds 0 --prefill-phase 64   # and the steps that prefill 64 prompts
  python -m benchmarks.step_speed --smoke --out /tmp/ss  # tiny model on CPU: checks the script only
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import throughput as tp
from benchmarks.common import run_env, timed, workload_parser
from benchmarks.kernel_profile import kernel_table
from parity import Engine, SamplingParams
from parity.kernels.triton import pdl
from parity.testing.factory import write_tiny_model

B_TEMPERATURE = 0.6


def batch1_ms_per_token(engine: Engine, prompt: list[int], new_tokens: int, clock: tp.Clock) -> float:
    """(time of new_tokens tokens - time of the first) / (new_tokens - 1), on a prompt already in the prefix cache."""
    def timed(n: int) -> float:
        start = clock.now()
        engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        return clock.now() - start

    timed(2)  # puts the prompt in the prefix cache, so both timings below prefill the same last block
    first = timed(1)
    return (timed(new_tokens) - first) / (new_tokens - 1) * 1e3


def step_kernels(engine: Engine, batch: int, context: int, steps: int, top: int) -> dict:
    """Kernels of a decode step of `batch` sequences (graph replay, sampler; torch.profiler sees inside graphs):
    launches and device microseconds per step, by kernel name."""
    from torch.profiler import ProfilerActivity, profile

    clock = tp.Clock(engine.device)
    tp.start_decoding(engine, batch, context)
    for _ in range(3):
        engine.step()
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = clock.now()
        for _ in range(steps):
            engine.step()
        wall = clock.now() - start
    engine.abort_all()
    kernel_s, rows = kernel_table(prof, 1000)
    return {
        "batch": batch, "steps": steps, "wall_ms_per_step_traced": wall / steps * 1e3,
        "dependent_launches": bool(pdl.ENABLED.value),
        "kernel_us_per_step": kernel_s / steps * 1e6, "launches_per_step": sum(r["calls"] for r in rows) / steps,
        "top": [{"name": r["name"], "us_per_step": r["ms"] * 1e3 / steps, "per_step": r["calls"] / steps}
                for r in rows[:top]],
    }


def prefill_kernels(engine: Engine, vocab: int, prompt_len: int, top: int) -> dict:
    """Time to first token of uncached prompts (median of 3, untraced), then one more traced: device time of its
    kernels against the wall time (far apart: the host decides) and the host's busiest calls."""
    from torch.profiler import ProfilerActivity, profile

    clock = tp.Clock(engine.device)
    fresh = tp.random_prompts(4, vocab, prompt_len, prompt_len, seed=7000)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def first_token(prompt: list[int]) -> float:
        start = clock.now()
        engine.generate([prompt], params)
        return clock.now() - start

    untraced = sorted(first_token(p) for p in fresh[:3])[1]
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        traced = first_token(fresh[3])
    kernel_s, rows = kernel_table(prof, 1000)
    host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return {
        "prompt_len": prompt_len, "ttft_ms": untraced * 1e3, "ttft_ms_traced": traced * 1e3,
        "kernel_ms": kernel_s * 1e3, "launches": sum(r["calls"] for r in rows),
        "top": [{"name": r["name"], "us": r["ms"] * 1e3, "calls": r["calls"]} for r in rows[:top]],
        "host_top": [{"name": e.key[:90], "self_us": e.self_cpu_time_total, "calls": e.count} for e in host],
    }


@contextlib.contextmanager
def host_timers(engine: Engine):
    """Seconds the host spends in each part of a step, accumulated while the block runs: scheduling, the runner's
    forward (host side: inputs, launches or replay), sampling's launches, waiting for the device's results, and the
    rest of booking them."""
    from parity.engine import sampler, step_pipeline

    totals = dict.fromkeys(("schedule", "forward", "sample", "wait", "book"), 0.0)
    patches = [(engine.scheduler, "schedule", "schedule"), (engine.runner, "execute", "forward"),
               (step_pipeline, "sample_sequences", "sample"), (sampler.HostCopy, "wait", "wait"),
               (engine.pipeline, "_book", "book")]

    def into(name):
        return lambda seconds: totals.__setitem__(name, totals[name] + seconds)

    saved = [(obj, attr, obj.__dict__.get(attr)) for obj, attr, _ in patches]
    for obj, attr, name in patches:
        setattr(obj, attr, timed(getattr(obj, attr), into(name)))
    try:
        yield totals
    finally:
        for obj, attr, old in saved:
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)
    totals["book"] -= totals["wait"]  # the waits happen inside booking


def prefill_phase_kernels(engine: Engine, vocab: int, num_prompts: int, lengths: tuple[int, int], top: int) -> dict:
    """Workload A's opening: `num_prompts` fresh prompts U[lengths] admitted at once, stepped until none is still
    prefilling (the steps that prefill, chunked to max_num_batched_tokens). Once untraced, with the host's time per
    part of a step (`host_timers`), then on other prompts traced: kernels by name, to set against the wall time."""
    from torch.profiler import ProfilerActivity, profile

    clock = tp.Clock(engine.device)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    sched = engine.scheduler

    def run(seed: int) -> tuple[int, float, int]:
        prompts = tp.random_prompts(num_prompts, vocab, *lengths, seed=seed)
        start = clock.now()
        for p in prompts:
            engine.add_request(p, params)
        steps = 0
        while sched.waiting or any(s.in_prefill for s in sched.running):
            engine.step()
            steps += 1
        wall = clock.now() - start
        engine.abort_all()
        return steps, wall, sum(map(len, prompts))

    with host_timers(engine) as host:
        steps, wall, tokens = run(8000)
    cuda = engine.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        traced_steps, traced_wall, _ = run(8001)
    kernel_s, rows = kernel_table(prof, 1000)
    return {
        "prompts": num_prompts, "prompt_tokens": tokens, "steps": steps, "wall_ms": wall * 1e3,
        "host_ms": {k: v * 1e3 for k, v in host.items()},
        "traced_steps": traced_steps, "traced_wall_ms": traced_wall * 1e3,
        "kernel_ms": kernel_s * 1e3, "launches": sum(r["calls"] for r in rows),
        "top": [{"name": r["name"], "us": r["ms"] * 1e3, "calls": r["calls"]} for r in rows[:top]],
    }


def measure(engine: Engine, enabled: bool, args, prompts, lens_b, clock: tp.Clock) -> dict:
    """A, B, batch 1 and the decode steps with async scheduling `enabled`. Each call starts from an empty prefix
    cache, so every round's A prefills its prompts (B then reuses A's, as in benchmarks.peer_vllm for both engines)."""
    engine.pipeline.enabled = enabled
    engine.scheduler.reset_prefix_cache()
    used, discarded = engine.pipeline.num_ahead_used, engine.pipeline.num_ahead_discarded
    res = {
        "A": tp.run_parity(engine, prompts, [args.output_len] * len(prompts), clock),
        "B": tp.run_parity(engine, prompts, lens_b, clock, temperature=B_TEMPERATURE),
        "batch1_ms_per_token": batch1_ms_per_token(engine, prompts[0], args.batch1_tokens, clock),
    }
    if args.device == "cuda":
        res["decode"] = [tp.decode_timing(engine, b, args.context, 16, None, clock) for b in (1, args.max_num_seqs)]
    res["ahead_used"] = engine.pipeline.num_ahead_used - used
    res["ahead_discarded"] = engine.pipeline.num_ahead_discarded - discarded
    return res


def main() -> None:
    ap = workload_parser(__doc__, "tiny model on CPU, a few prompts: checks the script only")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192, help="the prefill chunk (EngineConfig's default)")
    ap.add_argument("--rounds", type=int, default=1, help="off/on pairs, the order alternating")
    ap.add_argument("--batch1-tokens", type=int, default=256)
    ap.add_argument("--deterministic", action="store_true",
                    help="the batch-invariant kernels (with --rounds 0: only their batch-1 kernel table)")
    ap.add_argument("--spec", choices=sorted(tp.LONG_CONTEXT_SPECS), default="qwen3-0.6b")
    ap.add_argument("--kernel-batches", type=int, nargs="+", default=[1],
                    help="decode batch sizes whose kernels are listed (each at most --max-num-seqs)")
    ap.add_argument("--prefill-phase", type=int, default=0, metavar="N",
                    help="also trace the steps that prefill N fresh workload-A prompts admitted at once")
    ap.add_argument("--ttft", action="store_true",
                    help="also trace one uncached 1024-token prefill (time to first token: device vs host)")
    args = ap.parse_args()
    if bad := [b for b in args.kernel_batches if not 1 <= b <= args.max_num_seqs]:
        ap.error(f"--kernel-batches: each must be in [1, --max-num-seqs={args.max_num_seqs}], got {bad}")
    if args.prefill_phase < 0:
        ap.error(f"--prefill-phase: a number of prompts >= 0, got {args.prefill_phase}")
    args.device = "cpu" if args.smoke else "cuda"
    spec = replace(tp.SMOKE, max_position_embeddings=40960) if args.smoke else tp.LONG_CONTEXT_SPECS[args.spec]
    if args.smoke:
        args.num_prompts, args.output_len, args.max_model_len, args.max_num_seqs, args.batch1_tokens = 6, 6, 256, 4, 4
    args.context = 1024 if not args.smoke else 32
    lo, hi = (100, 1024) if not args.smoke else (10, 40)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = tp.Clock(torch.device(args.device))
    results: dict = {"env": run_env(args.device, args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp) / "model", spec)
        t0 = time.perf_counter()
        engine = Engine.from_pretrained(path, device=args.device, dtype="bf16", max_num_seqs=args.max_num_seqs,
                                        max_model_len=args.max_model_len, deterministic=args.deterministic,
                                        max_num_batched_tokens=args.max_num_batched_tokens)
        results["init_s"] = time.perf_counter() - t0
        vocab = engine.model_config.vocab_size
        prompts = tp.random_prompts(args.num_prompts, vocab, lo, hi, seed=0)
        lens_b = tp.output_lengths(args.num_prompts, lo, hi, seed=1)
        warm = tp.random_prompts(min(64, args.num_prompts), vocab, lo, hi, seed=99)  # no prefix-cache hits later
        for enabled in (False, True):  # compile every kernel variant outside the timed runs
            engine.pipeline.enabled = enabled
            tp.run_parity(engine, warm, [8] * len(warm), clock)
            tp.run_parity(engine, warm[:8], [8] * len(warm[:8]), clock, temperature=B_TEMPERATURE)
        for r in range(args.rounds):
            for enabled in ((False, True) if r % 2 == 0 else (True, False)):
                row = {"async_scheduling": enabled, **measure(engine, enabled, args, prompts, lens_b, clock)}
                results["runs"].append(row)
                (args.out / "step_speed.json").write_text(json.dumps(results, indent=1))
        batches = [min(b, 2) for b in args.kernel_batches] if args.smoke else args.kernel_batches
        # on CPU: no kernels listed
        results["step_kernels"] = [step_kernels(engine, b, args.context, 20, 25) for b in batches]
        if args.ttft:
            results["ttft"] = prefill_kernels(engine, vocab, args.context, 25)
        if args.prefill_phase:
            results["prefill_phase"] = prefill_phase_kernels(engine, vocab, args.prefill_phase, (lo, hi), 25)
        if args.device == "cuda" and not args.deterministic:
            from parity.kernels.triton.fast import few_row_choices
            results["few_row_choices"] = few_row_choices()
        (args.out / "step_speed.json").write_text(json.dumps(results, indent=1))
    print(summary(results["runs"]))
    for c in results.get("few_row_choices", []):
        times = ", ".join(f"{name} {us:.2f}" for name, us in c["us"].items())
        print(f"few-row {c['op']} x{c['rows']} {tuple(c['weight'])}: {c['chosen']} (us a call: {times})")
    if any(k["dependent_launches"] for k in results["step_kernels"]):
        print("(programmatic dependent launch on: a kernel's time includes its wait for the previous one in the "
              "small-batch graphs, so the times overlap; PARITY_PDL=0 gives each kernel's own)")
    for k in results["step_kernels"]:
        print(f"batch-{k['batch']} step: {k['launches_per_step']:.0f} launches, {k['kernel_us_per_step']:.0f} us of "
              f"kernels, {k['wall_ms_per_step_traced']:.3f} ms wall (traced)")
        for r in k["top"]:
            print(f"  {r['us_per_step']:8.1f} us {r['per_step']:6.1f}x  {r['name']}")
    if ttft := results.get("ttft"):
        print(f"TTFT {ttft['prompt_len']} tokens: {ttft['ttft_ms']:.1f} ms ({ttft['ttft_ms_traced']:.1f} traced), "
              f"{ttft['launches']} launches, {ttft['kernel_ms']:.2f} ms of kernels")
        for r in ttft["top"]:
            print(f"  {r['us']:8.1f} us {r['calls']:5d}x  {r['name']}")
        print("host, by own time:")
        for r in ttft["host_top"]:
            print(f"  {r['self_us']:8.1f} us {r['calls']:5d}x  {r['name']}")
    if pre := results.get("prefill_phase"):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in pre["host_ms"].items())
        print(f"prefill phase: {pre['prompts']} prompts, {pre['prompt_tokens']} tokens, {pre['steps']} steps, "
              f"{pre['wall_ms']:.1f} ms wall; host ms: {parts}")
        print(f"  traced (other prompts): {pre['traced_steps']} steps, {pre['traced_wall_ms']:.1f} ms wall, "
              f"{pre['launches']} launches, {pre['kernel_ms']:.2f} ms of kernels")
        for r in pre["top"]:
            print(f"  {r['us']:8.1f} us {r['calls']:5d}x  {r['name']}")


def summary(runs: list[dict]) -> str:
    lines = ["| async scheduling | A tok/s | B tok/s | batch 1 ms/token | decode steps (batch: engine step / graph ms) "
             "| look-ahead used / discarded |", "|---|---|---|---|---|---|"]
    for row in runs:
        decode = ", ".join(f"{d['batch']}: {d['engine_step_ms']:.2f} / {d.get('graph_replay_ms', float('nan')):.2f}"
                           for d in row.get("decode", []))
        lines.append(f"| {'on' if row['async_scheduling'] else 'off'} | {row['A']['output_tok_s']:,.0f} "
                     f"| {row['B']['output_tok_s']:,.0f} | {row['batch1_ms_per_token']:.3f} | {decode} "
                     f"| {row['ahead_used']} / {row['ahead_discarded']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
