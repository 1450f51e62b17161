"""Held-out evaluation: greedy accuracy on every problem of a task's held-out split, once each, with its
binomial standard error and 95% interval, and the paired gain between two evaluations of the same problems.

Greedy decoding makes an evaluation a deterministic function of the weights, so two evaluations differ
only where the model changed. The paired gain's standard error comes from the per-problem differences
(the problems both evaluations got right or wrong cancel), which is tighter than comparing the two
accuracies' own intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from parity.engine.sampling_params import SamplingParams
from parity.train.tasks import REWARDS, Problem, Task, score

Z95 = 1.959964


def accuracy_stats(correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy, binomial standard error sqrt(p(1-p)/n), and the 95% Wilson score interval."""
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy of an empty evaluation")
    p = sum(map(bool, correct)) / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return {"accuracy": p, "n": float(n), "se": math.sqrt(p * (1 - p) / n), "ci95_low": centre - half,
            "ci95_high": centre + half}


def paired_gain(before: Sequence[bool], after: Sequence[bool]) -> dict[str, float]:
    """after - before on the same problems: the gain, its standard error (per-problem differences), a 95%
    normal interval, and how many problems were fixed / broken."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired evaluations need the same non-empty problems, got {len(before)} and {len(after)}")
    d = [int(bool(a)) - int(bool(b)) for b, a in zip(before, after)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    se = math.sqrt(var / n)
    return {"gain": mean, "se": se, "ci95_low": mean - Z95 * se, "ci95_high": mean + Z95 * se,
            "fixed": float(d.count(1)), "broken": float(d.count(-1)), "n": float(n)}


@dataclass
class Evaluation:
    """One greedy pass over the evaluation problems: per-problem correctness under the task's reward
    (`correct`) and under each built-in reward (`by_reward`: "exact" = the bare answer, "last_numbers" = the
    answer ends the reply), which tells a format change from an arithmetic one."""

    stage: str  # "base" (before the warm-start), "warmstart", "step", "final"
    step: int  # GRPO steps done
    correct: list[bool]
    by_reward: dict[str, list[bool]]

    def metrics(self) -> dict[str, float]:
        s = accuracy_stats(self.correct)
        return {"eval/accuracy": s["accuracy"], "eval/accuracy_se": s["se"], "eval/ci95_low": s["ci95_low"],
                "eval/ci95_high": s["ci95_high"], "eval/problems": s["n"],
                **{f"eval/{kind}_accuracy": accuracy_stats(c)["accuracy"] for kind, c in self.by_reward.items()}}


def evaluate(engine, task: Task, problems: list[Problem], max_tokens: int, stage: str, step: int) -> Evaluation:
    """Greedy responses to `problems` (each once, prompts as in training), scored by every reward."""
    rollouts = engine.generate([task.prompt(p) for p in problems], SamplingParams(temperature=0, max_tokens=max_tokens))
    by_index = sorted(rollouts, key=lambda r: r.prompt_index)
    if [r.prompt_index for r in by_index] != list(range(len(problems))):
        raise RuntimeError("evaluation expects exactly one greedy response per problem")
    by_reward = {kind: [score(p, r.text, r.finish_reason, kind) == 1.0 for p, r in zip(problems, by_index)]
                 for kind in REWARDS}
    return Evaluation(stage, step, by_reward[task.config.reward], by_reward)
