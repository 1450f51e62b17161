"""TRL's GRPOTrainer three ways, same model, prompts, seeds and steps: TRL's own transformers generation, parity
as its rollout engine (fast: the HF model, bf16 autocast, engine in bf16), and parity exact (TRL trains parity's
own model, ParityForCausalLM, with the engine in deterministic mode).

Shape: TRL's GRPO example (GRPOConfig defaults: 8 completions per device and step, num_generations 8, so one
prompt per step; max_completion_length 512; learning rate 1e-6; bf16), except gradient checkpointing off for
all three (the 135M model fits; the same setting everywhere). Task: addition chat prompts from parity.train.tasks
("What is 13 + 9? Reply with just the number."), reward last_numbers (the reply's last integer, then EOS).
The exact mode trains in `--exact-dtype` (fp32 default: TRL's AdamW has no float32 master copy of a bf16 model).

Per step: generation seconds (TRL's `_generate`: tokenisation, rollout, decode; parity's weight sync counted
apart as sync_s), training seconds (the rest of the optimizer step: rewards, TRL's logprob passes, loss,
backward, optimizer), reward, and for the parity modes TRL's own `sampling/...` mismatch metrics. Medians skip
step 1 (warm-up). Writes JSON (with the run_env header) to --out.

  python -m benchmarks.trl_grpo --smoke                                   # CPU, tiny model, 2 steps
  python -m benchmarks.trl_grpo --steps 8 --out $OUT/trl_grpo.json        # GPU, SmolLM2-135M-Instruct
The GPU machine has no TRL, datasets, dill, multiprocess or gguf (it has accelerate, peft, pandas, pyarrow, xxhash,
fsspec), and takes 64 MiB per call, so the GGUF travels in two halves (docs/real_model.md):
  # here, once (git-ignored)
  python -m benchmarks.smollm2_device prepare                  # .gguf/part1, .gguf/part2 (+ sha256), ~47 MiB each
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/trl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0   # ~2 MiB
  # call 1, carry [".gguf/part1"]
  mkdir -p /tmp/sm && cp .gguf/part1/model.gguf.part1 /tmp/sm/
  # call 2 right after (warm machine), carry [".gguf/part2", ".whl/trl"]
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/trl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
  python3 -m benchmarks.smollm2_device join --first /tmp/sm --second .gguf/part2 --site /tmp/site \
    && python3 -m benchmarks.trl_grpo --steps 8 --out $OUT/trl_grpo.json 2>&1 | grep -v "it/s]" | tee $OUT/trl_grpo.log
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import free_memory, run_env

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

MODES = ("transformers", "parity-fast", "parity-exact")
METRICS = (
    "sampling/sampling_logp_difference/mean",
    "sampling/sampling_logp_difference/max",
    "sampling/importance_sampling_ratio/min",
    "sampling/importance_sampling_ratio/mean",
    "sampling/importance_sampling_ratio/max",
)


def model_dir(args) -> str:
    if args.smoke:
        from parity.testing.factory import default_model_dir

        return str(default_model_dir())
    from parity.models.loader import Checkpoint

    return str(Checkpoint.resolve(args.model).hf_dir())  # a GGUF alias is dequantized once into an HF dir


def make_dataset(args):
    from datasets import Dataset

    from parity.train.tasks import Task, TaskConfig

    task = Task(TaskConfig(name="addition", max_operand=49, holdout_fraction=0.2, chat=True, reward="last_numbers"))
    problems = task.sample(random.Random(args.seed), 512)
    return Dataset.from_dict({"prompt": [task.prompt(p) for p in problems], "answer": [p.answer for p in problems]})


def make_reward(eos_ids: set[int]):
    from parity.train.tasks import Problem, score

    def last_number_reward(completions, completion_ids, answer, **kwargs) -> list[float]:
        return [score(Problem("", a), c[0]["content"], "stop" if ids and ids[-1] in eos_ids else "length", "last_numbers")
                for c, ids, a in zip(completions, completion_ids, answer)]

    return last_number_reward


class StepClock:
    """Per-step wall times (device synchronised): the whole optimizer step, TRL's `_generate`, parity's sync."""

    def __init__(self, trainer, device: torch.device):
        from transformers import TrainerCallback

        self.device, self.rows, self._t0 = device, [], 0.0
        self._gen = self._sync = 0.0
        clock = self

        def timed(fn, field):
            def run(*a, **k):
                start = clock.now()
                try:
                    return fn(*a, **k)
                finally:
                    setattr(clock, field, getattr(clock, field) + clock.now() - start)
            return run

        trainer._generate = timed(trainer._generate, "_gen")
        generation = getattr(trainer, "vllm_generation", None)
        if generation is not None:
            generation.sync_weights = timed(generation.sync_weights, "_sync")

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock._t0, clock._gen, clock._sync = clock.now(), 0.0, 0.0

            def on_step_end(self, args, state, control, **kw):
                step = clock.now() - clock._t0
                gen = clock._gen - clock._sync
                clock.rows.append({"step": state.global_step, "step_s": step, "gen_s": gen, "sync_s": clock._sync,
                                   "train_s": step - clock._gen})

        trainer.add_callback(Callback())

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def run_mode(mode: str, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from parity.integrations.trl import ParityGRPOTrainer
    from parity.precision.policy import PrecisionPolicy
    from parity.trainer.causal_lm import ParityForCausalLM

    path = model_dir(args)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    exact = mode == "parity-exact"
    config = GRPOConfig(
        output_dir=str(Path(args.runs_dir) / mode), max_steps=args.steps, logging_steps=1, report_to=[],
        save_strategy="no", seed=args.seed, per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.lr, gradient_checkpointing=False, use_cpu=device.type == "cpu",
        bf16=not exact and device.type == "cuda", vllm_importance_sampling_mode="token_truncate",
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    if exact:
        dtype = "fp32" if args.smoke else args.exact_dtype
        model = ParityForCausalLM.from_pretrained(path, policy=PrecisionPolicy(dtype, deterministic=True), device=device,
                                                  max_positions=args.max_model_len)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    eos: set[int] = set()
    kwargs = dict(model=model, reward_funcs=make_reward(eos), args=config, train_dataset=make_dataset(args),
                  processing_class=tokenizer)
    start = time.perf_counter()
    trainer = GRPOTrainer(**kwargs) if mode == "transformers" else ParityGRPOTrainer(**kwargs)
    init_s = time.perf_counter() - start
    eos.update(trainer.eos_token_ids)
    clock = StepClock(trainer, device)
    trainer.train()
    logs = {h["step"]: h for h in trainer.state.log_history if "reward" in h}
    for row in clock.rows:
        logged = logs.get(row["step"], {})
        row["reward"] = logged.get("reward")
        row["completion_mean_length"] = logged.get("completions/mean_length")
        row.update({m: logged[m] for m in METRICS if m in logged})
    result = {"mode": mode, "init_s": init_s, "steps": clock.rows, "median": medians(clock.rows)}
    if mode != "transformers":
        engine = trainer.engine
        result["engine"] = {"dtype": str(engine.model.dtype), "deterministic": engine.model.kernels.deterministic,
                            "weight_version": engine.weight_version}
    del trainer, model
    free_memory(device)
    return result


def medians(rows: list[dict]) -> dict:
    body = rows[1:] or rows
    keys = ("step_s", "gen_s", "sync_s", "train_s")
    out = {k: statistics.median(r[k] for r in body) for k in keys}
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    out["reward_mean"] = sum(rewards) / len(rewards) if rewards else None
    for m in METRICS:
        values = [r[m] for r in rows if m in r]
        if values:
            out[m] = max(values) if m.endswith("/max") else min(values) if m.endswith("/min") else statistics.mean(values)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny factory model, 2 short steps")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model alias, .gguf or HF directory")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (TRL's default 8)")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048, help="exact mode: the parity model's RoPE table length")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--exact-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="runs/trl_grpo")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if args.smoke:
        args.steps, args.batch_size, args.num_generations, args.max_completion_length = 2, 4, 2, 8
        args.max_model_len = 256
        torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    import trl

    result = {"env": {**run_env(device, args), "trl": trl.__version__}, "runs": []}
    for mode in modes:
        result["runs"].append(run_mode(mode, args))
        med = result["runs"][-1]["median"]
        print(f"{mode:>13}: step {med['step_s']:.2f}s  gen {med['gen_s']:.2f}s  sync {med['sync_s']:.3f}s  "
              f"train {med['train_s']:.2f}s  reward {med['reward_mean']}  "
              f"|dlogp| max {med.get('sampling/sampling_logp_difference/max')}", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))  # rewritten after each mode: a cut run keeps its modes
    by_mode = {r["mode"]: r["median"] for r in result["runs"]}
    if "transformers" in by_mode:
        result["generation_speedup"] = {
            mode: by_mode["transformers"]["gen_s"] / by_mode[mode]["gen_s"]
            for mode in ("parity-fast", "parity-exact") if mode in by_mode and by_mode[mode]["gen_s"] > 0
        }
        for mode, speedup in result["generation_speedup"].items():
            print(f"generation speedup {mode} vs transformers (median step): {speedup:.1f}x")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
