"""GRPO on one GPU with parity embedded in the trainer's process: fp16 vs bf16, same model, same task.

Model: random init with Qwen3-0.6B's shapes (configs/grpo_qwen3_shapes.yaml), written once in HF
format and used by both runs. For each precision (engine dtype = trainer autocast dtype; fp16 trains
with accelerate's loss scaling), one `parity train` run (warm-start, then GRPO steps), then on the
same trainer and engine:
  - weight sync: per-step seconds and GB/s inside the loop, plus 5 standalone syncs;
  - sleep / wake, level 1 (offload weights, free KV) and level 2 (discard both; wake weights, sync,
    wake KV): memory_allocated / memory_reserved before and after, wake time, whether the weights
    came back at the same addresses, and the first rollout after wake (CUDA-graph recapture) vs the next;
  - rollout throughput: 128 task prompts x 128 sampled tokens (EOS ignored);
  - mismatch metrics (engine vs trainer logprobs of the sampled tokens), per step and averaged.
Writes OUT/grpo_device.json and OUT/grpo_device.md. Needs no wandb.

  python -m benchmarks.grpo_device --out results/grpo            # GPU, about 2-3 minutes on an H100
  python -m benchmarks.grpo_device --smoke --out /tmp/grpo_smoke # tiny model on CPU: checks the script
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import run_env
from parity import SamplingParams
from parity.engine.sleep import MemorySnapshot
from parity.testing.factory import write_tiny_model
from parity.train.config import load_train_config
from parity.train.grpo import GRPOTrainer

CONFIG = Path(__file__).parent.parent / "configs" / "grpo_qwen3_shapes.yaml"
SMOKE = [  # a tiny Qwen3-shaped model on the CPU, a few steps: exercises every code path of the script
    "model.factory.hidden_size=64", "model.factory.intermediate_size=128", "model.factory.num_layers=2",
    "model.factory.num_heads=4", "model.factory.num_kv_heads=2", "model.factory.head_dim=16",
    "model.factory.padded_vocab_size=1000", "model.factory.init_device=cpu", "model.factory.save_dtype=float32",
    "warmstart.steps=5", "warmstart.batch_size=8", "rollout.prompts_per_step=4", "engine.max_num_seqs=32",
    "engine.kv_cache_memory=8388608", "device=cpu", "steps=3",
]
MISMATCH_KEYS = ("mismatch/logp_abs_diff_mean", "mismatch/logp_abs_diff_max", "mismatch/mismatch_k3_kl",
                 "mismatch/ratio_min", "mismatch/ratio_max", "mismatch/rollout_is_mean",
                 "mismatch/rollout_is_ratio_fraction_high")


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed_generate(engine, prompts: list[str], params: SamplingParams) -> tuple[float, int]:
    start = now(engine.device)
    rollouts = engine.generate(prompts, params)
    return now(engine.device) - start, sum(len(r.output_ids) for r in rollouts)


def measure_sync(trainer: GRPOTrainer, repeats: int = 5) -> dict:
    model = trainer.accelerator.unwrap_model(trainer.model)
    stats = [trainer.engine.update_weights(model) for _ in range(repeats)]
    seconds = statistics.median(s.seconds for s in stats)
    return {"median_s": seconds, "bytes": stats[0].bytes_copied, "num_tensors": stats[0].num_tensors,
            "gb_per_s": stats[0].bytes_copied / seconds / 1e9}


def measure_sleep(trainer: GRPOTrainer, prompts: list[str]) -> dict:
    """Each level: sleep, wake (level 2: weights, sync, KV), then two rollouts (the first re-captures graphs)."""
    engine = trainer.engine
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = SamplingParams(n=1, max_tokens=16, ignore_eos=True, seed=0)
    reference, _ = timed_generate(engine, prompts, params)
    out = {"rollout_s_before_sleep": reference}
    for level in (1, 2):
        stats = engine.sleep(level)
        asleep = MemorySnapshot.take(engine.device)
        start = now(engine.device)
        if level == 1:
            wake = engine.wake_up()
            addresses = wake.addresses_preserved
        else:
            addresses = engine.wake_up(["weights"]).addresses_preserved
            engine.update_weights(model)
            engine.wake_up(["kv_cache"])
        wake_s = now(engine.device) - start
        awake = MemorySnapshot.take(engine.device)
        first, _ = timed_generate(engine, prompts, params)
        second, _ = timed_generate(engine, prompts, params)
        out[f"level{level}"] = {
            "kv_cache_bytes": stats.kv_cache_bytes, "weight_bytes": stats.weight_bytes, "host_bytes": stats.host_bytes,
            "freed_bytes": stats.freed_bytes, "freed_reserved_bytes": stats.freed_reserved_bytes,
            "allocated_before": stats.before.allocated, "allocated_asleep": asleep.allocated,
            "allocated_awake": awake.allocated, "reserved_before": stats.before.reserved,
            "reserved_asleep": asleep.reserved, "sleep_s": stats.seconds, "wake_s": wake_s,
            "addresses_preserved": addresses, "first_rollout_after_wake_s": first, "second_rollout_s": second,
        }
    return out


def measure_throughput(trainer: GRPOTrainer, num_prompts: int, max_tokens: int) -> dict:
    prompts = [p.prompt for p in trainer.task.sample(random.Random(1), num_prompts)]
    params = SamplingParams(n=1, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    timed_generate(trainer.engine, prompts[:8], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    seconds, tokens = timed_generate(trainer.engine, prompts, params)
    return {"prompts": num_prompts, "max_tokens": max_tokens, "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds}


def run_precision(dtype: str, model_dir: Path, args, extra: list[str]) -> dict:
    overrides = [f"engine.dtype={dtype}", f"optim.mixed_precision={dtype}",
                 f"model.path={model_dir}", f"out_dir={args.out / dtype}", "tracking.mode=disabled", *extra]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    config = load_train_config(CONFIG, overrides)
    start = time.perf_counter()
    trainer = GRPOTrainer(config)
    setup_s = time.perf_counter() - start
    history = trainer.train(progress=False).history
    train_s = time.perf_counter() - start - setup_s
    mean = lambda key: statistics.fmean(h[key] for h in history)
    result = {
        "dtype": dtype, "steps": len(history),
        "parameters": sum(p.numel() for p in trainer.engine.model.parameters()),
        "setup_s": setup_s, "train_s": train_s, "warmstart_loss": trainer.warmstart_loss,
        "reward_first3": statistics.fmean(h["reward/mean"] for h in history[:3]),
        "reward_last3": statistics.fmean(h["reward/mean"] for h in history[-3:]),
        "sync_s_per_step_median": statistics.median(h["sync/seconds"] for h in history),
        "sync_gb_per_s_median": statistics.median(h["sync/gb_per_s"] for h in history),
        "phase_s_mean": {p: mean(f"time/{p}_s") for p in ("rollout", "logprob", "train", "sync")},
        "loop_rollout_tokens_per_s_mean": mean("throughput/rollout_tokens_per_s"),
        "mismatch_mean_over_steps": {k: mean(k) for k in MISMATCH_KEYS},
        "sync_standalone": measure_sync(trainer),
        "sleep": measure_sleep(trainer, [p.prompt for p in trainer.task.sample(random.Random(2), 32)]),
        "throughput": measure_throughput(trainer, args.throughput_prompts, args.throughput_tokens),
        "history": history,
    }
    if trainer.device.type == "cuda":
        result["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(trainer.device)
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def markdown(report: dict) -> str:
    runs = report["runs"]
    lines = [
        f"## GRPO on the device: {' vs '.join(r['dtype'] for r in runs)} ({report['date']}, {report['device']})",
        "",
        f"Command: `{report['command']}`. Model: {report['model']} ({runs[0]['parameters'] / 1e6:.1f}M parameters), "
        f"task: addition, {runs[0]['steps']} GRPO steps after a {report['warmstart_steps']}-step warm-start, "
        "engine and trainer in one process on one device. Each column: engine dtype = trainer autocast dtype.",
        "",
        "| metric | " + " | ".join(r["dtype"] for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    rows = [
        ("reward, first 3 steps -> last 3", lambda r: f"{r['reward_first3']:.3f} -> {r['reward_last3']:.3f}"),
        ("weight sync per step, median (ms)", lambda r: f"{1e3 * r['sync_s_per_step_median']:.1f}"),
        ("weight sync, standalone median (ms) / GB/s",
         lambda r: f"{1e3 * r['sync_standalone']['median_s']:.1f} / {r['sync_standalone']['gb_per_s']:.0f}"),
        ("bytes per sync (GiB)", lambda r: gib(r["sync_standalone"]["bytes"])),
        ("sleep level 1: freed allocated / reserved (GiB)",
         lambda r: f"{gib(r['sleep']['level1']['freed_bytes'])} / {gib(r['sleep']['level1']['freed_reserved_bytes'])}"),
        ("sleep level 2: freed allocated / reserved (GiB)",
         lambda r: f"{gib(r['sleep']['level2']['freed_bytes'])} / {gib(r['sleep']['level2']['freed_reserved_bytes'])}"),
        ("wake level 1 / level 2 incl. sync (ms)",
         lambda r: f"{1e3 * r['sleep']['level1']['wake_s']:.0f} / {1e3 * r['sleep']['level2']['wake_s']:.0f}"),
        ("weights back at the same addresses (l1 / l2)",
         lambda r: f"{r['sleep']['level1']['addresses_preserved']} / {r['sleep']['level2']['addresses_preserved']}"),
        ("first rollout after wake vs next (s)",
         lambda r: f"{r['sleep']['level1']['first_rollout_after_wake_s']:.2f} vs {r['sleep']['level1']['second_rollout_s']:.2f}"),
        ("rollout throughput, prompts x sampled tokens (tok/s)",
         lambda r: f"{r['throughput']['prompts']} x {r['throughput']['max_tokens']}: {r['throughput']['tokens_per_s']:.0f}"),
        ("mean phase time rollout / logprob / train / sync (s)",
         lambda r: " / ".join(f"{v:.3f}" for v in r["phase_s_mean"].values())),
    ]
    rows += [(f"{k} (mean over steps)", lambda r, k=k: f"{r['mismatch_mean_over_steps'][k]:.3g}") for k in MISMATCH_KEYS]
    lines += [f"| {name} | " + " | ".join(fmt(r) for r in runs) + " |" for name, fmt in rows]
    ratio = report.get("bf16_over_fp16_mean_abs_logp_diff")
    if ratio is not None:
        lines += ["", f"bf16 / fp16 mean |Δlogp| over the run: {ratio:.1f}x"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtypes", default=None, help="comma-separated (default fp16,bf16; smoke: bf16,fp32)")
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per precision (default: the config's)")
    parser.add_argument("--throughput-prompts", type=int, default=128)
    parser.add_argument("--throughput-tokens", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to check the script")
    args = parser.parse_args()
    extra = SMOKE if args.smoke else []
    if args.smoke:
        args.throughput_prompts, args.throughput_tokens = 8, 16
    dtypes = (args.dtypes or ("bf16,fp32" if args.smoke else "fp16,bf16")).split(",")
    args.out.mkdir(parents=True, exist_ok=True)

    base = load_train_config(CONFIG, extra)
    start = time.perf_counter()
    model_dir = write_tiny_model(args.out / "model", base.model.factory)
    write_s = time.perf_counter() - start
    runs = [run_precision(dtype, model_dir, args, extra) for dtype in dtypes]
    report = {
        **run_env("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"),
        "model": "Qwen3-0.6B shapes, random init" if not args.smoke else "tiny Qwen3-shaped smoke model",
        "warmstart_steps": base.warmstart.steps, "model_write_s": write_s, "total_s": time.perf_counter() - start,
        "runs": runs,
    }
    by_dtype = {r["dtype"]: r for r in runs}
    if "fp16" in by_dtype and "bf16" in by_dtype:
        diff = lambda d: by_dtype[d]["mismatch_mean_over_steps"]["mismatch/logp_abs_diff_mean"]
        report["bf16_over_fp16_mean_abs_logp_diff"] = diff("bf16") / diff("fp16") if diff("fp16") > 0 else None
    (args.out / "grpo_device.json").write_text(json.dumps(report, indent=2))
    (args.out / "grpo_device.md").write_text(markdown(report))
    print(markdown(report))
    print(f"total {report['total_s']:.0f} s; wrote {args.out / 'grpo_device.json'} and grpo_device.md")


if __name__ == "__main__":
    main()
