"""Built-in verifiable tasks for the GRPO loop: generated in-process, exact-match reward, no download.

A task draws `Problem`s (prompt text + the one correct answer text). A rollout earns reward 1 when
it stopped by itself (EOS) and its decoded text, stripped, equals the answer; anything else is 0.
`warmstart_examples` gives prompt/answer pairs for the optional supervised warm-start, from a
teacher that is right with probability `accuracy` and otherwise answers another random problem:
the warm-started policy then puts some mass on the right answer of every prompt (RL has something
to find everywhere) but mostly misses it (rewards start low).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from parity.rollout.sequence import Rollout


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


@dataclass
class TaskConfig:
    """name: "addition" (a+b= with operands 0..max_operand) or "sort" (sort `length` digits 0..max_operand)."""

    name: str = "addition"
    max_operand: int = 4
    length: int = 3

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; built-in tasks: {', '.join(TASKS)}")
        if not 1 <= self.max_operand <= 99:
            raise ValueError(f"max_operand must be in [1, 99], got {self.max_operand}")
        if self.length < 2:
            raise ValueError(f"sort length must be >= 2, got {self.length}")


def addition_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    a, b = rng.randint(0, cfg.max_operand), rng.randint(0, cfg.max_operand)
    return Problem(f"{a}+{b}=", str(a + b))


def sort_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    digits = [rng.randint(0, cfg.max_operand) for _ in range(cfg.length)]
    return Problem(f"sort {' '.join(map(str, digits))}:", " ".join(map(str, sorted(digits))))


TASKS = {"addition": addition_problem, "sort": sort_problem}


class Task:
    def __init__(self, config: TaskConfig):
        self.config = config
        self._draw = TASKS[config.name]

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        return [self._draw(rng, self.config) for _ in range(n)]

    def warmstart_examples(self, rng: random.Random, n: int, accuracy: float) -> list[Problem]:
        examples = []
        for problem in self.sample(rng, n):
            if rng.random() >= accuracy:
                problem = Problem(problem.prompt, self.sample(rng, 1)[0].answer)
            examples.append(problem)
        return examples

    @staticmethod
    def reward(problem: Problem, rollout: Rollout) -> float:
        """1.0 for an exact answer that ended with EOS, else 0.0."""
        if rollout.finish_reason != "stop" or rollout.text is None:
            return 0.0
        return float(rollout.text.strip() == problem.answer)
