"""Built-in tasks: chat prompts through the tokenizer's template (the same ids in rollouts, warm-start and
evaluation), the held-out split evaluated whole and once per problem, the `last_numbers` reward on hand
cases, and the evaluation statistics against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest

from parity import Engine
from parity.engine.sequence import Rollout
from parity.train.evaluation import accuracy_stats, evaluate, paired_gain
from parity.train.tasks import Problem, Task, TaskConfig, score


def rollout(text: str, finish: str = "stop", index: int = 0) -> Rollout:
    return Rollout(str(index), index, 0, [1], [2, 0], [-0.1, -0.1], finish, text=text)


# ------------------------------------------------------------------------------------------ rewards
@pytest.mark.parametrize("text, finish, expected", [
    ("22", "stop", 1.0),
    (" 22\n", "stop", 1.0),
    ("13 + 9 = 22", "stop", 1.0),
    ("The answer is 22.", "stop", 1.0),
    ("13+9=22", "stop", 1.0),
    ("22 or maybe 23", "stop", 0.0),  # the last number counts, not any number
    ("122", "stop", 0.0),
    ("13 + 9 = 22", "length", 0.0),  # no EOS: not an answer
    ("I cannot add.", "stop", 0.0),
    ("", "stop", 0.0),
])
def test_last_numbers_reward_on_addition(text, finish, expected):
    task = Task(TaskConfig(reward="last_numbers", max_operand=20))
    assert task.reward(Problem("13+9=", "22"), rollout(text, finish)) == expected
    assert Task(TaskConfig(max_operand=20)).reward(Problem("13+9=", "22"), rollout(text, finish)) == float(
        finish == "stop" and text.strip() == "22")  # exact: the bare answer only


def test_last_numbers_reward_on_sort():
    problem = Task(TaskConfig(name="sort", length=3, max_operand=9)).spec.make((3, 1, 2))
    assert problem.answer == "1 2 3"
    cases = {"1 2 3": 1.0, "1, 2, 3": 1.0, "3 1 2 sorted is 1 2 3.": 1.0, "2 3": 0.0, "1 2 3 4": 0.0, "3 2 1": 0.0}
    for text, expected in cases.items():
        assert score(problem, text, "stop", "last_numbers") == expected, text
    with pytest.raises(ValueError, match="unknown reward 'close'"):
        TaskConfig(reward="close")


# ------------------------------------------------------------------------------------ chat prompts
def test_chat_prompt_is_the_question_through_the_tokenizers_template(llama_dir):
    engine = Engine.from_pretrained(llama_dir, dtype="fp32", device="cpu", kv_cache_memory=1 << 20)
    chat, plain = Task(TaskConfig(max_operand=20, chat=True)), Task(TaskConfig(max_operand=20))
    problem = chat.spec.make((13, 9))
    assert problem == Problem("13+9=", "22", "What is 13 + 9? Reply with just the number.")
    expected = engine.tokenizer.apply_chat_template([{"role": "user", "content": problem.question}],
                                                    add_generation_prompt=True, tokenize=False)
    assert expected.endswith("<|im_start|>assistant\n") and problem.question in expected
    assert engine.encode(chat.prompt(problem)) == engine.tokenizer.encode(expected, add_special_tokens=False)
    assert engine.encode(plain.prompt(problem)) == engine.tokenizer.encode("13+9=")
    # The split keys on the bare prompt: the same problems are held out with and without chat.
    held = Task(TaskConfig(max_operand=20, holdout_fraction=0.2, chat=True)).heldout_problems()
    assert held == Task(TaskConfig(max_operand=20, holdout_fraction=0.2)).heldout_problems()


def test_rollouts_warmstart_and_eval_see_the_same_chat_prompt_ids(llama_dir, tmp_path, monkeypatch):
    """Every prompt the trainer feeds (supervised warm-start rows, GRPO rollouts, held-out evaluation) is the
    chat-template rendering of one of the task's problems."""
    from transformers import AutoTokenizer

    import parity.train.grpo as grpo
    from parity.train.config import load_train_config

    config = load_train_config(None, [
        f"out_dir={tmp_path}", f"model.path={llama_dir}", "tracking.mode=disabled", "steps=1",
        "task.chat=true", "task.max_operand=4", "task.holdout_fraction=0.3", "eval.enabled=true",
        "engine.max_model_len=128", "warmstart.steps=1", "warmstart.batch_size=4", "rollout.prompts_per_step=2",
        "rollout.group_size=2",
    ])
    seen: dict[str, list[list[int]]] = {"warmstart": [], "generate": []}
    sft_batch, generate = grpo._sft_batch, Engine.generate

    def record_sft(prompts, answers, eos, device):
        seen["warmstart"] += prompts
        return sft_batch(prompts, answers, eos, device)

    def record_generate(self, prompts, params=None, use_tqdm=False):
        out = generate(self, prompts, params, use_tqdm)
        seen["generate"] += [r.prompt_ids for r in out]
        return out

    monkeypatch.setattr(grpo, "_sft_batch", record_sft)
    monkeypatch.setattr(Engine, "generate", record_generate)
    result = grpo.run_grpo(config, progress=False)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    task = Task(config.task)
    rendered = {tuple(tok.apply_chat_template([{"role": "user", "content": p.question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)): p for p in task.all_problems()}
    assert len(seen["warmstart"]) == 4 and len(seen["generate"]) == 4 + 3 * len(task.heldout_problems())
    for ids in seen["warmstart"] + seen["generate"]:
        assert tuple(ids) in rendered, tok.decode(ids)
    train_prompts = {rendered[tuple(ids)].prompt for ids in seen["warmstart"]}
    assert not train_prompts & {p.prompt for p in task.heldout_problems()}
    assert [e.stage for e in result.evals] == ["base", "warmstart", "final"]


# ---------------------------------------------------------------------------------- held-out split
def test_heldout_split_is_enumerated_whole_and_once():
    task = Task(TaskConfig(max_operand=49, holdout_fraction=0.2))
    held = task.heldout_problems()
    prompts = [p.prompt for p in held]
    assert len(set(prompts)) == len(prompts)  # no duplicates
    assert all(task.is_held_out(p) for p in held)
    train = {p.prompt for p in task.sample(random.Random(0), 20_000)}
    assert not train & set(prompts)
    assert len(train) + len(prompts) == 50 * 50  # train draws reach every other sum: the two splits partition
    assert 400 < len(held) < 600  # ~20% of 2500: standard error ~2 points at 50% accuracy
    assert held == task.heldout_problems()  # a fixed order
    with pytest.raises(ValueError, match="no held-out split"):
        Task(TaskConfig()).heldout_problems()
    with pytest.raises(ValueError, match="too many to enumerate"):
        Task(TaskConfig(name="sort", length=8, max_operand=99, holdout_fraction=0.1)).heldout_problems()


class OracleEngine:
    """Answers addition prompts right when the sum is even, wrong otherwise, returning responses shuffled."""

    def generate(self, prompts, params):
        out = []
        for i, prompt in enumerate(prompts):
            a, b = map(int, prompt.rstrip("=").split("+"))
            out.append(rollout(str(a + b) if (a + b) % 2 == 0 else str(a + b + 1), index=i))
        random.Random(0).shuffle(out)
        return out


def test_evaluation_scores_each_problem_once_in_order():
    task = Task(TaskConfig(max_operand=9, holdout_fraction=0.3))
    held = task.heldout_problems()
    result = evaluate(OracleEngine(), task, held, max_tokens=4, stage="base", step=0)
    assert result.correct == [int(p.answer) % 2 == 0 for p in held]
    assert result.by_reward["exact"] == result.by_reward["last_numbers"] == result.correct  # bare numbers
    assert result.metrics()["eval/problems"] == len(held)
    assert result.metrics()["eval/accuracy"] == pytest.approx(sum(result.correct) / len(held))


class SentenceEngine(OracleEngine):
    """Answers every addition right, in a sentence."""

    def generate(self, prompts, params):
        return [rollout(f"{p.rstrip('=').replace('+', ' + ')} = {sum(map(int, p.rstrip('=').split('+')))}", index=i)
                for i, p in enumerate(prompts)]


def test_evaluation_reports_both_rewards_whatever_the_task_uses():
    held = Task(TaskConfig(max_operand=9, holdout_fraction=0.3)).heldout_problems()
    for kind in ("exact", "last_numbers"):
        task = Task(TaskConfig(max_operand=9, holdout_fraction=0.3, reward=kind))
        m = evaluate(SentenceEngine(), task, held, max_tokens=16, stage="final", step=3).metrics()
        assert m["eval/exact_accuracy"] == 0.0 and m["eval/last_numbers_accuracy"] == 1.0
        assert m["eval/accuracy"] == m[f"eval/{kind}_accuracy"]


# --------------------------------------------------------------------------------------- statistics
def test_accuracy_stats_match_hand_values_and_scipy():
    s = accuracy_stats([True] * 50 + [False] * 50)
    assert s["accuracy"] == 0.5 and s["se"] == pytest.approx(0.05) and s["n"] == 100
    # Wilson interval, 0 of 10: upper bound z^2 / (n + z^2).
    s = accuracy_stats([False] * 10)
    assert s["ci95_low"] == pytest.approx(0.0, abs=1e-12) and s["ci95_high"] == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((40, 200), (1, 7), (499, 500)):
        ci = stats.binomtest(k, n).proportion_ci(method="wilson")
        s = accuracy_stats([True] * k + [False] * (n - k))
        assert (s["ci95_low"], s["ci95_high"]) == pytest.approx((ci.low, ci.high), abs=1e-6)


def test_paired_gain_uses_the_per_problem_differences():
    before = [1, 0, 0, 1, 0, 1, 0, 0]
    after = [1, 1, 1, 0, 0, 1, 1, 0]
    g = paired_gain(before, after)
    d = [a - b for a, b in zip(after, before)]  # [0, 1, 1, -1, 0, 0, 1, 0]
    mean = sum(d) / 8
    assert g["gain"] == pytest.approx(0.25) and g["fixed"] == 3 and g["broken"] == 1
    assert g["se"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 7 / 8))
    with pytest.raises(ValueError, match="same non-empty problems"):
        paired_gain([1, 0], [1])
