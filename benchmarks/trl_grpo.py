"""TRL's GRPOTrainer three ways, same model, prompts, seeds and settings, one mode after the other: parity as its
rollout engine (fast: the HF model, bf16 autocast, engine in bf16), parity exact (TRL trains parity's own model,
ParityForCausalLM, with the engine in deterministic mode), and TRL's own transformers generation.

Shape, chosen so SmolLM2-135M-Instruct's reward moves within ~20-30 steps (TRL's GRPO example, 8 completions
per step, max_completion_length 512 and lr 1e-6, showed no learning in 5 steps): addition chat prompts from
parity.train.tasks ("What is 13 + 9? Reply with just the number."), reward last_numbers (the reply's last
integer, then EOS within max_completion_length, 24 tokens), 16 prompts x 8 completions per optimizer step,
lr 3e-5 constant, everything else TRL's GRPOConfig defaults (loss dapo, beta 0, clip 0.2, grad norm 1.0,
temperature 1.0) but gradient checkpointing off (the 135M model fits) and TRL's IS correction in
`token_truncate` mode. This is the shape under which parity's own GRPO loop took the reward from 0.0 to 0.68 in
9 steps on an H100 (benchmarks/RESULTS.md, `bf16-rl-only`); the reward then rises as the model both adds
right and finishes its sentence within 24 tokens. The exact mode trains in `--exact-dtype` (fp32 default:
TRL's AdamW keeps no float32 master copy of a bf16 model).

Modes run in order parity-fast, parity-exact, transformers; the transformers path runs `--transformers-steps`
only (its generation is the slow part: its per-step time is what it is measured for, its reward curve is
shorter). `--budget-s` bounds the whole run from process start: each mode may use the share of what is left
when it starts that its step count is of the steps still to run (time a mode leaves unused goes to the next), and
stops after the step that passes it.

Per step: generation seconds (TRL's `_generate`: tokenisation, rollout, decode; parity's weight sync counted
apart as sync_s), training seconds (the rest of the optimizer step: rewards, TRL's logprob passes, loss,
backward, optimizer), reward, completion length, and for the parity modes TRL's own `sampling/...` mismatch
metrics. Exact mode must log a logp difference of exactly 0 at every step: recorded per step
(`logp_difference_zero`) and overall (`exact_logp_difference_zero_every_step`); the script exits 1 when it
fails. The JSON (with the run_env header) is rewritten after every step, so a cut run keeps what it measured.
Medians skip step 1 (warm-up).

  python -m benchmarks.trl_grpo --smoke                                   # CPU, tiny model, 2 short steps
  python -m benchmarks.trl_grpo --out $OUT/trl_grpo.json                  # GPU, SmolLM2-135M-Instruct
TRL's example shape, for comparison: --prompts-per-step 1 --max-completion-length 512 --lr 1e-6.
The GPU machine has no TRL, datasets, dill, multiprocess or gguf (it has accelerate, peft, pandas, pyarrow, xxhash,
fsspec), and takes 64 MiB per call, so the GGUF travels in two halves (docs/real_model.md):
  # here, once (git-ignored)
  python -m benchmarks.smollm2_device prepare                  # .gguf/part1, .gguf/part2 (+ sha256), ~47 MiB each
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/trl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0   # ~2 MiB
  # call 1, carry [".gguf/part1"]
  mkdir -p /tmp/sm && cp .gguf/part1/model.gguf.part1 /tmp/sm/
  # call 2 right after (warm machine), carry [".gguf/part2", ".whl/trl"], timeout_s 240
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/trl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit
  python3 -m benchmarks.smollm2_device join --first /tmp/sm --second .gguf/part2 --site /tmp/site \
    && python3 -m benchmarks.trl_grpo --budget-s 200 --out $OUT/trl_grpo.json 2>&1 | grep -v "it/s]" \
    | tee $OUT/trl_grpo.log
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

from benchmarks.common import free_memory, run_env, timed

START = time.perf_counter()  # --budget-s counts from here
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

MODES = ("parity-fast", "parity-exact", "transformers")
METRICS = (
    "sampling/sampling_logp_difference/mean",
    "sampling/sampling_logp_difference/max",
    "sampling/importance_sampling_ratio/min",
    "sampling/importance_sampling_ratio/mean",
    "sampling/importance_sampling_ratio/max",
)
LOGGED = {"reward": "reward", "reward_std": "reward_std", "completion_mean_length": "completions/mean_length",
          "clipped_ratio": "completions/clipped_ratio", "entropy": "entropy", "grad_norm": "grad_norm"}
CURVE_EDGE = 5  # steps averaged at each end of the reward curve
PROMPT_ROOM = 256  # positions for the chat prompt (SmolLM2's template with its system turn: ~47 tokens)


def model_dir(args) -> str:
    if args.smoke:
        from parity.testing.factory import default_model_dir

        return str(default_model_dir())
    from parity.models.loader import Checkpoint

    return str(Checkpoint.resolve(args.model).hf_dir())  # a GGUF alias is dequantized once into an HF dir


def make_dataset(args, rows: int):
    from datasets import Dataset

    from parity.train.tasks import Task, TaskConfig

    task = Task(TaskConfig(name="addition", max_operand=49, holdout_fraction=0.2, chat=True, reward=args.reward))
    problems = task.sample(random.Random(args.seed), rows)
    return Dataset.from_dict({"prompt": [task.prompt(p) for p in problems], "answer": [p.answer for p in problems]})


def make_reward(eos_ids: set[int], kind: str):
    from parity.train.tasks import Problem, score

    def addition_reward(completions, completion_ids, answer, **kwargs) -> list[float]:
        return [score(Problem("", a), c[0]["content"], "stop" if ids and ids[-1] in eos_ids else "length", kind)
                for c, ids, a in zip(completions, completion_ids, answer)]

    return addition_reward


class StepRecorder:
    """Per optimizer step: wall times (device synchronised) of the whole step, TRL's `_generate` and parity's
    sync; TRL's logged metrics; the mode's deadline (training stops after the step that passes it); the JSON
    rewritten through `save` after every logged step."""

    def __init__(self, trainer, device: torch.device, deadline: float, exact: bool, save):
        from transformers import TrainerCallback

        self.device, self.deadline, self.exact, self.save = device, deadline, exact, save
        self.rows: list[dict] = []
        self.stopped_by_budget = False
        self._t0 = self._gen = self._sync = 0.0
        rec = self

        def into(field):
            return lambda seconds: setattr(rec, field, getattr(rec, field) + seconds)

        trainer._generate = timed(trainer._generate, into("_gen"), rec.now)
        generation = getattr(trainer, "vllm_generation", None)
        if generation is not None:
            generation.sync_weights = timed(generation.sync_weights, into("_sync"), rec.now)

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                rec._t0, rec._gen, rec._sync = rec.now(), 0.0, 0.0

            def on_step_end(self, args, state, control, **kw):
                step = rec.now() - rec._t0
                rec.rows.append({"step": state.global_step, "step_s": step, "gen_s": rec._gen - rec._sync,
                                 "sync_s": rec._sync, "train_s": step - rec._gen})
                if time.perf_counter() > rec.deadline and state.global_step < args.max_steps:
                    rec.stopped_by_budget = control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kw):  # TRL logs after on_step_end
                if not logs or "reward" not in logs or not rec.rows or rec.rows[-1]["step"] != state.global_step:
                    return
                row = rec.rows[-1]
                row.update({k: logs[name] for k, name in LOGGED.items() if name in logs})
                row.update({m: logs[m] for m in METRICS if m in logs})
                if rec.exact:
                    row["logp_difference_zero"] = (logs.get(METRICS[0]) == 0.0 and logs.get(METRICS[1]) == 0.0)
                rec.save()

        trainer.add_callback(Callback())

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def grpo_config(args, mode: str, device: torch.device, steps: int):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(Path(args.runs_dir) / mode), max_steps=steps, logging_steps=1, report_to=[],
        save_strategy="no", seed=args.seed, per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.lr, lr_scheduler_type="constant", gradient_checkpointing=False,
        use_cpu=device.type == "cpu", bf16=mode != "parity-exact" and device.type == "cuda",
        vllm_importance_sampling_mode="token_truncate",
    )


def mode_steps(args, mode: str) -> int:
    return args.transformers_steps if mode == "transformers" else args.steps


def run_mode(mode: str, args, deadline: float, save) -> dict:
    """One TRL run; `save(result)` is called with the partial result after every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from parity.integrations.trl import ParityGRPOTrainer
    from parity.precision.policy import PrecisionPolicy
    from parity.trainer.causal_lm import ParityForCausalLM

    path = model_dir(args)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    exact = mode == "parity-exact"
    steps = mode_steps(args, mode)
    config = grpo_config(args, mode, device, steps)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if exact:
        model = ParityForCausalLM.from_pretrained(path, policy=PrecisionPolicy(args.exact_dtype, deterministic=True),
                                                  device=device, max_positions=args.max_model_len)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    eos: set[int] = set()
    kwargs = dict(model=model, reward_funcs=make_reward(eos, args.reward), args=config, processing_class=tokenizer,
                  train_dataset=make_dataset(args, max(512, steps * args.prompts_per_step)))
    start = time.perf_counter()
    trainer = GRPOTrainer(**kwargs) if mode == "transformers" else ParityGRPOTrainer(**kwargs)
    result = {"mode": mode, "init_s": time.perf_counter() - start, "max_steps": steps, "steps": []}
    eos.update(trainer.eos_token_ids)
    recorder = StepRecorder(trainer, device, deadline, exact, lambda: save(summarize(result, recorder)))
    result["steps"] = recorder.rows
    trainer.train()
    summarize(result, recorder)
    if mode != "transformers":
        engine = trainer.engine
        result["engine"] = {"dtype": str(engine.model.dtype), "deterministic": engine.model.kernels.deterministic,
                            "weight_version": engine.weight_version}
    save(result)
    del trainer, model
    free_memory(device)
    return result


def summarize(result: dict, recorder: StepRecorder) -> dict:
    """Fill in the mode's medians, reward curve and (exact mode) the every-step zero check; returns `result`."""
    rows = recorder.rows
    result["stopped_by_budget"] = recorder.stopped_by_budget
    result["median"] = medians(rows) if rows else {}
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    result["reward_curve"] = rewards
    if len(rewards) >= 2 * CURVE_EDGE:
        result["reward_first_steps_mean"] = statistics.mean(rewards[:CURVE_EDGE])
        result["reward_last_steps_mean"] = statistics.mean(rewards[-CURVE_EDGE:])
    if recorder.exact:
        result["exact_logp_difference_zero_every_step"] = bool(rows) and all(r.get("logp_difference_zero") for r in rows)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, the tiny factory model, 2 short steps per mode")
    p.add_argument("--model", default="smollm2-135m-instruct", help="model alias, .gguf or HF directory")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, run in this order; of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each parity mode")
    p.add_argument("--transformers-steps", type=int, default=8, help="optimizer steps of TRL's transformers path")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock limit of the whole run from start")
    p.add_argument("--prompts-per-step", type=int, default=16, help="prompts per optimizer step (x num_generations)")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=24)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="exact mode: the parity model's RoPE table length (default: max completion length + 256)")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--reward", default="last_numbers", choices=("last_numbers", "exact"))
    p.add_argument("--exact-dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default="runs/trl_grpo")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        p.error(f"--modes: unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    for name in ("steps", "transformers_steps", "prompts_per_step", "num_generations", "max_completion_length"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.smoke:
        args.steps, args.transformers_steps, args.prompts_per_step, args.num_generations = 2, 2, 2, 2
        args.max_completion_length, args.exact_dtype = 8, "fp32"
    if args.max_model_len is None:
        args.max_model_len = args.max_completion_length + PROMPT_ROOM
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    import trl

    result = {"env": {**run_env(device, args), "trl": trl.__version__}, "runs": []}

    def save(run: dict | None = None) -> None:
        if run is not None and not any(r is run for r in result["runs"]):  # a mode's first step adds its record
            result["runs"].append(run)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))

    for i, mode in enumerate(args.modes):
        deadline = float("inf")
        if args.budget_s is not None:  # this mode's steps' share of the time left to the modes still to run
            left = START + args.budget_s - time.perf_counter()
            steps = [mode_steps(args, m) for m in args.modes[i:]]
            deadline = time.perf_counter() + left * steps[0] / sum(steps)
        run = run_mode(mode, args, deadline, save)
        med = run["median"]
        print(f"{mode:>13}: {len(run['steps'])} steps  step {med['step_s']:.2f}s  gen {med['gen_s']:.2f}s  "
              f"sync {med['sync_s']:.3f}s  train {med['train_s']:.2f}s  reward {run['reward_curve']}  "
              f"|dlogp| max {med.get(METRICS[1])}", flush=True)
    by_mode = {r["mode"]: r["median"] for r in result["runs"]}
    if "transformers" in by_mode:
        result["generation_speedup"] = {
            mode: by_mode["transformers"]["gen_s"] / by_mode[mode]["gen_s"]
            for mode in ("parity-fast", "parity-exact") if mode in by_mode and by_mode[mode]["gen_s"] > 0
        }
        for mode, speedup in result["generation_speedup"].items():
            print(f"generation speedup {mode} vs transformers (median step): {speedup:.1f}x")
    save()
    exact = [r for r in result["runs"] if r["mode"] == "parity-exact"]
    if exact and not exact[0]["exact_logp_difference_zero_every_step"]:
        print("FAILED: exact mode logged a nonzero logp difference (or none) at some step", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
