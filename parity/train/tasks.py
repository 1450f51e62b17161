"""Built-in verifiable tasks for the GRPO loop: generated in-process, checkable reward, no download.

A task draws `Problem`s: a few integers 0..max_operand (two for addition, `length` for sort) turned into
a bare text prompt ("13+9="), the same question as a user message ("What is 13 + 9? Reply with just the
number."), and the one correct answer text. With `chat`, prompts are that message rendered by the
tokenizer's chat template (what an instruct model was trained on); otherwise the bare text.

Rewards (`reward`), both 0 unless the response stopped by itself (EOS):
  exact         the decoded text, stripped, equals the answer.
  last_numbers  the last N integers in the text equal the answer's N integers (N = 1 for addition: the
                last integer). For a chat model that answers in its own words ("13 + 9 = 22"), so that
                RL rewards the arithmetic without first having to teach the bare-number format.

`warmstart_examples` gives prompt/answer pairs for the optional supervised warm-start, from a
teacher that is right with probability `accuracy` and otherwise answers another random problem:
the warm-started policy then puts some mass on the right answer of every prompt (RL has something
to find everywhere) but mostly misses it (rewards start low).

`holdout_fraction` reserves problems for evaluation by a fixed hash of the bare prompt (the same split
with and without `chat`, on every machine); `heldout_problems` lists that split, each problem once.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from parity.engine.sequence import Rollout

REWARDS = ("exact", "last_numbers")
# The most problems `heldout_problems` enumerates to find the held-out split.
MAX_ENUMERATED = 1_000_000


@dataclass(frozen=True)
class Problem:
    prompt: str  # bare text prompt ("13+9="); also the key of the held-out split
    answer: str
    question: str = ""  # the same problem as a user message, for chat prompts


@dataclass
class TaskConfig:
    """name: "addition" (a+b= with operands 0..max_operand) or "sort" (sort `length` numbers 0..max_operand).

    holdout_fraction: the share of all problems reserved for evaluation, chosen by a fixed hash of the
    prompt; training never draws them (0 = no split, and no held-out evaluation).
    chat: prompts are the question as a user message through the tokenizer's chat template.
    reward: "exact" (the bare answer, then EOS) or "last_numbers" (the answer's numbers end the text, then EOS).
    """

    name: str = "addition"
    max_operand: int = 4
    length: int = 3
    holdout_fraction: float = 0.0
    chat: bool = False
    reward: str = "exact"

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; built-in tasks: {', '.join(TASKS)}")
        if not 1 <= self.max_operand <= 99:
            raise ValueError(f"max_operand must be in [1, 99], got {self.max_operand}")
        if self.length < 2:
            raise ValueError(f"sort length must be >= 2, got {self.length}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; expected one of {', '.join(REWARDS)}")


def addition_problem(operands: tuple[int, ...]) -> Problem:
    a, b = operands
    return Problem(f"{a}+{b}=", str(a + b), f"What is {a} + {b}? Reply with just the number.")


def sort_problem(operands: tuple[int, ...]) -> Problem:
    listed = " ".join(map(str, operands))
    return Problem(f"sort {listed}:", " ".join(map(str, sorted(operands))),
                   f"Sort these numbers from smallest to largest: {listed}. Reply with just the sorted numbers, "
                   "separated by spaces.")


@dataclass(frozen=True)
class TaskSpec:
    arity: Callable[[TaskConfig], int]  # how many integers 0..max_operand make one problem
    make: Callable[[tuple[int, ...]], Problem]


TASKS = {
    "addition": TaskSpec(lambda cfg: 2, addition_problem),
    "sort": TaskSpec(lambda cfg: cfg.length, sort_problem),
}


def score(problem: Problem, text: str | None, finish_reason: str | None, kind: str = "exact") -> float:
    """1.0 if a response (its decoded text and why it ended) earns the `kind` reward, else 0.0."""
    if finish_reason != "stop" or text is None:
        return 0.0
    if kind == "exact":
        return float(text.strip() == problem.answer)
    if kind == "last_numbers":
        want = [int(x) for x in problem.answer.split()]
        got = [int(x) for x in re.findall(r"\d+", text)]
        return float(got[-len(want):] == want)
    raise ValueError(f"unknown reward {kind!r}; expected one of {', '.join(REWARDS)}")


class Task:
    def __init__(self, config: TaskConfig):
        self.config = config
        self.spec = TASKS[config.name]

    def _draw(self, rng: random.Random) -> Problem:
        return self.spec.make(tuple(rng.randint(0, self.config.max_operand) for _ in range(self.spec.arity(self.config))))

    def all_problems(self) -> Iterator[Problem]:
        """Every problem of the task, in a fixed order."""
        cfg = self.config
        return map(self.spec.make, itertools.product(range(cfg.max_operand + 1), repeat=self.spec.arity(cfg)))

    def is_held_out(self, problem: Problem) -> bool:
        """Whether `problem` belongs to the evaluation split (a fixed hash of its prompt, same everywhere)."""
        return zlib.crc32(problem.prompt.encode()) % 10_000 < self.config.holdout_fraction * 10_000

    def heldout_problems(self) -> list[Problem]:
        """The whole held-out split, each problem once, in a fixed order (what an evaluation should cover)."""
        cfg = self.config
        if cfg.holdout_fraction == 0.0:
            raise ValueError("the task has no held-out split; set task.holdout_fraction > 0")
        total = (cfg.max_operand + 1) ** self.spec.arity(cfg)
        if total > MAX_ENUMERATED:
            raise ValueError(f"task {cfg.name!r} has {total} problems, too many to enumerate its held-out split "
                             f"(at most {MAX_ENUMERATED}); lower max_operand or length")
        return [p for p in self.all_problems() if self.is_held_out(p)]

    def sample(self, rng: random.Random, n: int) -> list[Problem]:
        """`n` random problems of the training split (never a held-out one; evaluation takes
        `heldout_problems`). Without a holdout, the whole task."""
        if self.config.holdout_fraction == 0.0:
            return [self._draw(rng) for _ in range(n)]
        problems: list[Problem] = []
        for _ in range(1000 * n):
            problem = self._draw(rng)
            if not self.is_held_out(problem):
                problems.append(problem)
                if len(problems) == n:
                    return problems
        raise ValueError(f"the training split of task {self.config.name!r} is (nearly) empty; change holdout_fraction")

    def prompt(self, problem: Problem) -> str | list[dict[str, str]]:
        """What the model is given (an engine prompt): the bare text, or with `chat` the question as a
        one-message conversation, which `Engine.encode` renders through the tokenizer's chat template."""
        return [{"role": "user", "content": problem.question}] if self.config.chat else problem.prompt

    def warmstart_examples(self, rng: random.Random, n: int, accuracy: float) -> list[Problem]:
        examples = []
        for problem in self.sample(rng, n):
            if rng.random() >= accuracy:
                problem = dataclasses.replace(problem, answer=self.sample(rng, 1)[0].answer)
            examples.append(problem)
        return examples

    def reward(self, problem: Problem, rollout: Rollout) -> float:
        """The configured reward (`exact` or `last_numbers`) of one rollout; 0 without EOS."""
        return score(problem, rollout.text, rollout.finish_reason, self.config.reward)
