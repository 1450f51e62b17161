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
import zlib
from dataclasses import dataclass

from parity.rollout.sequence import Rollout


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


@dataclass
class TaskConfig:
    """name: "addition" (a+b= with operands 0..max_operand) or "sort" (sort `length` digits 0..max_operand).

    holdout_fraction: the share of all problems reserved for evaluation, chosen by a fixed hash of the
    prompt; training never draws them (0 = no split: evaluation draws from the training distribution).
    """

    name: str = "addition"
    max_operand: int = 4
    length: int = 3
    holdout_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; built-in tasks: {', '.join(TASKS)}")
        if not 1 <= self.max_operand <= 99:
            raise ValueError(f"max_operand must be in [1, 99], got {self.max_operand}")
        if self.length < 2:
            raise ValueError(f"sort length must be >= 2, got {self.length}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


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

    def is_held_out(self, problem: Problem) -> bool:
        """Whether `problem` belongs to the evaluation split (a fixed hash of its prompt, same everywhere)."""
        return zlib.crc32(problem.prompt.encode()) % 10_000 < self.config.holdout_fraction * 10_000

    def sample(self, rng: random.Random, n: int, split: str = "train") -> list[Problem]:
        """`n` problems of the training split, or of the held-out evaluation split (`split="eval"`).
        Without a holdout both splits are the whole task."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if self.config.holdout_fraction == 0.0:
            return [self._draw(rng, self.config) for _ in range(n)]
        want_held_out = split == "eval"
        problems: list[Problem] = []
        for _ in range(1000 * n):
            problem = self._draw(rng, self.config)
            if self.is_held_out(problem) == want_held_out:
                problems.append(problem)
                if len(problems) == n:
                    return problems
        raise ValueError(f"the {split} split of task {self.config.name!r} is (nearly) empty; change holdout_fraction")

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
