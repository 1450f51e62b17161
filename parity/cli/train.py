"""`parity train CONFIG`: GRPO on a built-in verifiable task with parity as the rollout engine."""

from __future__ import annotations

import argparse

from parity.train.tracking import WANDB_MODES

# The last step's metrics worth a glance in the terminal; all of them are in metrics.jsonl / W&B.
LAST_STEP_KEYS = (
    "reward/mean", "response_length/mean", "mismatch/logp_abs_diff_mean", "mismatch/logp_abs_diff_max",
    "mismatch/mismatch_k3_kl", "mismatch/ratio_min", "mismatch/ratio_max", "mismatch/rollout_is_eff_sample_size",
    "throughput/rollout_tokens_per_s", "sync/seconds", "sleep/freed_bytes",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="GRPO on a built-in task (in-process weight sync, W&B tracking)",
        description="Run GRPO with parity as the in-process rollout engine. Without CONFIG, the built-in "
        "default (configs/grpo_tiny_arith.yaml: tiny factory model, single-digit addition) runs on CPU in "
        "well under a minute. Metrics go to OUT/metrics.jsonl and, unless disabled, an offline W&B run.",
    )
    p.add_argument("config", nargs="?", help="YAML config (default: the built-in tiny arithmetic run)")
    p.add_argument("--steps", type=int, help="GRPO steps (overrides the config)")
    p.add_argument("--out", help="output directory (overrides out_dir)")
    p.add_argument("--seed", type=int, help="seed (overrides the config)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--model", help="model to train (overrides model.path): an HF directory, a .gguf file or an "
                   "alias such as smollm2-135m-instruct (a GGUF is exported once to an HF directory in the cache)")
    p.add_argument("--wandb-mode", choices=WANDB_MODES, help="W&B mode (default from the config: offline)")
    p.add_argument("--wandb-project", help="W&B project")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set rollout.group_size=16 (repeatable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (the tiny default runs fastest with 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from parity.train.config import load_train_config
    from parity.train.grpo import run_grpo

    flags = {"steps": args.steps, "out_dir": args.out, "seed": args.seed, "device": args.device, "model.path": args.model,
             "tracking.mode": args.wandb_mode, "tracking.project": args.wandb_project}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    config = load_train_config(args.config, overrides)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the terminal to our own progress bar
    console = Console()
    console.print(f"[bold]parity train[/bold]: task={config.task.name} steps={config.steps} "
                  f"engine={config.engine.dtype} trainer={config.optim.mixed_precision} out={config.out_dir}")
    result = run_grpo(config, progress=not args.no_progress)

    table = Table(title="GRPO run", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    last = result.history[-1] if result.history else {}
    for key in LAST_STEP_KEYS:
        if key in last:
            table.add_row(f"last step: {key}", f"{last[key]:.4g}")
    console.print(table)
    console.print(f"metrics: {result.metrics_file}")
    if result.run_dir is not None:
        console.print(f"W&B run: {result.run_dir}  (offline runs: `wandb sync {result.run_dir}`)")
    return 0
