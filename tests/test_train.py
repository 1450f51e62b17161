"""`parity train`: the default GRPO run raises the reward; every step logs its metrics; the engine
stays in step with the trainer; config loading refuses bad input; the built-in tasks score exactly."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from parity.cli.main import main
from parity.engine.sequence import Rollout
from parity.train.config import TrainConfig, load_train_config
from parity.train.grpo import run_grpo
from parity.train.tasks import Problem, Task, TaskConfig
from parity.train.tracking import read_offline_run

DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "grpo_tiny_arith.yaml"
STEP_KEYS = (
    "reward/mean", "response_length/mean", "mismatch/logp_abs_diff_max", "mismatch/mismatch_k3_kl",
    "mismatch/rollout_is_mean", "mismatch/rollout_is_eff_sample_size", "actor/pg_loss", "actor/grad_norm",
    "time/rollout_s", "time/logprob_s", "time/train_s", "time/sync_s", "throughput/rollout_tokens_per_s",
    "sync/seconds", "weight_version",
)


@pytest.fixture
def one_thread():
    """The tiny model's matmuls gain nothing from intra-op threads; on shared cores they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_default_run_raises_reward(tmp_path, one_thread):
    """The built-in default (fp32 on CPU, fixed seed): mean reward from < 0.3 to > 0.7 in 40 steps."""
    out = tmp_path / "run"
    assert main(["train", str(DEFAULT_CONFIG), "--out", str(out), "--wandb-mode", "offline", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert len(rows) == 40
    for row in rows:
        assert set(STEP_KEYS) <= row.keys()
        # Engine (fp32) and trainer (HF, fp32) agree on every sampled token, every step, after every sync.
        assert row["mismatch/logp_abs_diff_max"] < 1e-4
    assert [r["weight_version"] for r in rows] == list(range(2, 42))  # warm-start sync, then one per step
    reward = [r["reward/mean"] for r in rows]
    first, last = sum(reward[:3]) / 3, sum(reward[-5:]) / 5
    assert first < 0.3 and last > 0.7, f"reward {first:.2f} -> {last:.2f}: {[round(x, 2) for x in reward]}"

    run = read_offline_run(next((out / "wandb").glob("offline-run-*")))
    assert run.config["task"]["name"] == "addition" and run.config["rollout"]["group_size"] == 8
    assert [h["reward/mean"] for h in run.history] == reward
    assert run.summary["final/reward_last"] == pytest.approx(sum(reward[-3:]) / 3)
    assert run.summary["reward/mean"] == reward[-1]


def test_sleeping_bf16_loop_keeps_engine_in_step(tmp_path, one_thread):
    """bf16 trainer (accelerate autocast) and engine; the engine sleeps (level 2) through every train phase."""
    config = load_train_config(DEFAULT_CONFIG, [
        f"out_dir={tmp_path}", "steps=2", "rollout.prompts_per_step=4", "sleep_level=2", "engine.dtype=bf16",
        "optim.mixed_precision=bf16", "tracking.mode=disabled", "loss.importance_sampling.method=mis",
    ])
    result = run_grpo(config, progress=False)
    for row in result.history:
        assert row["sleep/freed_bytes"] > 0
        assert 0 < row["mismatch/logp_abs_diff_max"] < 0.5  # bf16 rounding, nothing broken
        assert row["mismatch/rollout_is_kept_fraction"] > 0.9
    assert read_metrics(tmp_path)[-1]["weight_version"] == 3



def test_warmstart_teaches_the_eos_the_engine_stops_on(tmp_path, one_thread):
    """The warm-start ends answers with the model config's EOS, not the tokenizer's: transformers 5.17 reads
    SmolLM2's GGUF tokenizer with eos_token <|im_start|> while the model (and so the engine and the reward)
    ends with <|im_end|>; warm-starting on the tokenizer's token left every rollout at max_tokens, reward 0."""
    from parity.engine.sampling_params import SamplingParams
    from parity.testing.factory import TinyModelSpec, write_tiny_model
    from parity.train.grpo import GRPOTrainer

    model_dir = write_tiny_model(tmp_path / "model", TinyModelSpec(hidden_size=128, intermediate_size=256))
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**tok_config, "eos_token": "<|im_start|>"}))
    config = load_train_config(DEFAULT_CONFIG, [f"out_dir={tmp_path / 'run'}", f"model.path={model_dir}",
                                                "warmstart.steps=40", "tracking.mode=disabled"])
    trainer = GRPOTrainer(config)
    assert trainer.tokenizer.eos_token == "<|im_start|>"  # the disagreement under test is really there
    problems = trainer.task.sample(random.Random(1), 32)
    rollouts = trainer.engine.generate([p.prompt for p in problems], SamplingParams(temperature=0, max_tokens=4))
    stopped = sum(r.finish_reason == "stop" for r in rollouts) / len(rollouts)
    accuracy = sum(trainer.task.reward(problems[r.prompt_index], r) for r in rollouts) / len(rollouts)
    assert stopped > 0.9 and accuracy > 0.3, f"stopped with EOS {stopped:.0%}, accuracy {accuracy:.0%}"

def test_default_config_file_is_the_dataclass_default():
    assert load_train_config(DEFAULT_CONFIG) == TrainConfig()


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "optim.lrr"),
    ("steps=many", "steps: expected int"),
    ("engine.dtype=fp8", "unknown dtype"),
    ("loss.importance_sampling.method=clip", "unknown IS method"),
    ("loss.agg=sum", "loss.agg"),
    ("tracking.mode=cloud", "wandb mode"),
    ("sleep_level=3", "sleep_level"),
    ("eval.enabled=true", "holdout_fraction > 0"),
    ("task.reward=close", "unknown reward 'close'"),
    ("eval.every=-1", "eval.every"),
])
def test_bad_config_is_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(DEFAULT_CONFIG, [override])


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert main(["train", "--set", "task.name=calculus"]) == 2
    assert "unknown task 'calculus'" in capsys.readouterr().err


def rollout(text: str, finish: str = "stop") -> Rollout:
    return Rollout("0", 0, 0, [1], [2, 0], [-0.1, -0.1], finish, text=text)


def test_task_rewards_are_exact_match():
    problem, task = Problem("3+4=", "7"), Task(TaskConfig())
    assert task.reward(problem, rollout("7")) == 1.0
    assert task.reward(problem, rollout(" 7 ")) == 1.0
    assert task.reward(problem, rollout("7", finish="length")) == 0.0  # no EOS: not an answer
    assert task.reward(problem, rollout("77")) == 0.0
    assert task.reward(problem, rollout("3 + 4 = 7")) == 0.0  # exact: the bare answer only
    rng = random.Random(0)
    for p in Task(TaskConfig(name="addition", max_operand=9)).sample(rng, 50):
        a, b = p.prompt.rstrip("=").split("+")
        assert int(p.answer) == int(a) + int(b) and 0 <= int(a) <= 9
    for p in Task(TaskConfig(name="sort", length=4)).sample(rng, 50):
        digits = p.prompt.removeprefix("sort ").rstrip(":").split()
        assert p.answer.split() == sorted(digits, key=int) and len(digits) == 4


def test_warmstart_teacher_accuracy():
    task = Task(TaskConfig())
    examples = task.warmstart_examples(random.Random(0), 2000, accuracy=0.3)
    right = sum(int(e.answer) == sum(map(int, e.prompt.rstrip("=").split("+"))) for e in examples) / len(examples)
    # Right with probability 0.3, plus wrong-teacher answers that happen to be right by chance.
    assert 0.3 < right < 0.45
    assert all(dataclasses.astuple(e) for e in examples)


def test_holdout_split_is_disjoint_and_stable():
    """With holdout_fraction, training draws never hit an evaluation problem, and the split is a fixed
    function of the prompt (the same on every machine and every seed)."""
    task = Task(TaskConfig(name="addition", max_operand=20, holdout_fraction=0.2))
    train = task.sample(random.Random(0), 3000)
    held = task.heldout_problems()
    train_prompts, held_prompts = {p.prompt for p in train}, {p.prompt for p in held}
    assert not train_prompts & held_prompts
    assert len(train_prompts) + len(held_prompts) == 441  # every sum 0..20 + 0..20 lands in exactly one split
    assert 0.1 < len(held_prompts) / 441 < 0.3
    assert all(Task(TaskConfig(name="addition", max_operand=20, holdout_fraction=0.2)).is_held_out(p) for p in held)
    assert not {p.prompt for p in task.warmstart_examples(random.Random(2), 500, accuracy=1.0)} & held_prompts
    with pytest.raises(ValueError, match="holdout_fraction"):
        TaskConfig(holdout_fraction=1.0)


def test_time_limit_stops_grpo_early_and_still_evaluates(tmp_path, one_thread):
    """time_limit_s: no GRPO step starts that would end past the limit (0 s: none), the held-out evaluation
    still runs after the loop, and the summary says the run was cut short."""
    config = load_train_config(DEFAULT_CONFIG, [
        f"out_dir={tmp_path}", "time_limit_s=0", "tracking.mode=disabled", "task.holdout_fraction=0.3",
        "eval.enabled=true", "warmstart.steps=2",
    ])
    result = run_grpo(config, progress=False)
    assert result.history == [] and result.summary["final/steps"] == 0
    assert result.summary["final/stopped_at_time_limit"] == 1.0
    assert [(e.stage, e.step) for e in result.evals] == [("base", 0), ("warmstart", 0), ("final", 0)]
    assert result.evals[-1].correct == result.evals[1].correct  # no step: the same weights, the same answers
    assert result.summary["eval/grpo_gain"] == 0.0 and result.summary["eval/grpo_gain_n"] == len(result.evals[0].correct)


def test_nonfinite_gradient_skips_the_update(tmp_path, one_thread):
    """A minibatch whose gradient holds nan (injected by a hook) leaves the weights untouched and is counted,
    instead of writing nan into the trainer and, at the next sync, the engine."""
    from parity.train.grpo import GRPOTrainer

    config = load_train_config(DEFAULT_CONFIG, [f"out_dir={tmp_path}", "warmstart.steps=0", "tracking.mode=disabled",
                                                "rollout.prompts_per_step=4", "loss.num_minibatches=1"])
    trainer = GRPOTrainer(config)
    weight = trainer.model.get_input_embeddings().weight
    before = weight.detach().clone()
    handle = weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    metrics = trainer.step()
    handle.remove()
    assert metrics["actor/nonfinite_grad_skipped"] == 1.0 and not math.isfinite(metrics["actor/grad_norm"])
    assert torch.equal(weight.detach(), before)
    assert all(torch.isfinite(p).all() for p in trainer.engine.model.parameters())
    metrics = trainer.step()  # the next, clean step is not skipped
    assert metrics["actor/nonfinite_grad_skipped"] == 0.0 and math.isfinite(metrics["actor/grad_norm"])
