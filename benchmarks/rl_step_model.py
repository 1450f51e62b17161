"""A cost model of an RL step with a long tail, to predict each rollout design's seconds per step before a GPU run.

An engine step costs fixed + per_seq * (sequences decoding) + per_context_token * (keys they attend over) +
per_prefill_token * (prompt or recomputed tokens). The fixed and per-context terms come from the decode-only
measurements on the H200 (RESULTS.md, "parity beside vLLM": graph replay 1.38 ms at batch 1, context 1040,
9.28 ms at batch 256, context 1056; the engine step adds 0.22 ms and 1.64 ms of host work); the prefill term from
the in-flight recompute of 512 samples (118 ms for ~78k tokens). `fit` finds per_seq (host, sampler and
bookkeeping per sequence, which the greedy microbenchmark does not pay in full) from the per-step seconds of
an earlier `benchmarks.async_rollout` JSON.

The simulator replays the scheduler at the level of "events" (a sample finishing): between two, the running set
is fixed, so k decode steps cost k * (fixed + per_seq * B) + per_context_token * (k * S + B * k (k - 1) / 2).
Sample lengths are geometric (mean `mean_len`, cut at `max_tokens`), prompts U[32, 256], groups of n; at most
`max_num_seqs` samples decode, the others wait in arrival order and join a full batch once `admit_seats` seats
are free. The designs are benchmarks.async_rollout's modes:
  plain        the step's K groups at once; the step ends when all are done.
  oversample   G groups; the step ends when K are complete; the rest is thrown away.
  partial      the pool is topped up to G groups not yet trained; the step ends when K are complete; the
               unfinished samples are aborted and continue first in line next step, their KV recomputed.
  keep         as partial, but the unfinished samples stay in flight through the update (their KV kept).

  python -m benchmarks.rl_step_model                                   # predictions with the fitted model
  python -m benchmarks.rl_step_model --fit benchmarks/results/async_rollout-2026-12-01-h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StepCost:
    """Seconds of engine work (H200, Qwen3-0.6B shapes, bf16); see the module docstring for where each comes from."""

    fixed: float = 1.565e-3
    per_seq: float = 5.6e-6
    per_context_token: float = 2.93e-8
    per_prefill_token: float = 1.5e-6

    def vector(self) -> np.ndarray:
        return np.array([self.fixed, self.per_seq, self.per_context_token, self.per_prefill_token])


def decode_work(steps: int, batch: int, context: int) -> np.ndarray:
    """Work of `steps` decode steps of `batch` sequences whose contexts sum to `context` at the first (+1 each per
    step), in StepCost's terms: (steps, sequence-steps, keys attended, prefill tokens)."""
    return np.array([steps, steps * batch, steps * context + batch * steps * (steps - 1) / 2, 0.0])


@dataclass(frozen=True)
class Workload:
    groups: int = 64  # K: groups the trainer takes per step
    samples: int = 8  # n
    mean_len: float = 518.0  # measured on the H200 (the stop set gives ~1/518 per token)
    max_tokens: int = 4096
    prompt_lens: tuple[int, int] = (32, 256)


@dataclass(frozen=True)
class Design:
    mode: str  # plain | oversample | partial | keep
    max_num_seqs: int = 512
    started_groups: int = 0  # G: groups started per step (oversample) or kept in the pool (partial, keep)
    admit_seats: int = 32  # a full batch admits only once this many seats are free (generate_groups' admit_seats)

    def label(self) -> str:
        extra = "" if self.mode == "plain" else f" G={self.started_groups}"
        return f"{self.mode}{extra} cap={self.max_num_seqs}"


@dataclass
class Sample:
    group: int
    prompt_len: int
    target_len: int
    produced: int = 0
    versions: list[int] = field(default_factory=list)  # one weight version per produced token, compressed below
    segment_start: int = 0  # produced count when the current version began
    needs_prefill: bool = True


@dataclass
class StepResult:
    work: np.ndarray  # in StepCost's terms (see decode_work)
    trained_tokens: int
    thrown_away: int
    carried: int
    prefill_tokens: int
    stale_share: float
    max_lag: int


class Simulator:
    """One engine and a stream of groups; `step()` runs one RL step of the design and returns what it cost."""

    def __init__(self, work: Workload, design: Design, seed: int):
        self.work, self.design = work, design
        self.rng = np.random.default_rng(seed)
        self.version = 0
        self.next_group = 0
        self.carried: list[Sample] = []  # partial: aborted samples and finished ones of incomplete groups
        self.waiting: deque[Sample] = deque()
        self.running: list[Sample] = []
        self.done: dict[int, list[Sample]] = {}  # group -> its finished samples
        self.open_groups: set[int] = set()

    def new_groups(self, count: int) -> None:
        lo, hi = self.work.prompt_lens
        p = 1.0 / self.work.mean_len
        for _ in range(count):
            g, self.next_group = self.next_group, self.next_group + 1
            prompt = int(self.rng.integers(lo, hi + 1))
            lens = np.minimum(self.rng.geometric(p, size=self.work.samples), self.work.max_tokens)
            self.waiting.extend(Sample(g, prompt, int(n)) for n in lens)
            self.open_groups.add(g)

    def close_segment(self, s: Sample) -> None:
        s.versions.extend([self.version] * (s.produced - s.segment_start))
        s.segment_start = s.produced

    def step(self) -> StepResult:
        d, work = self.design, self.work
        if d.mode == "plain":
            self.new_groups(work.groups)
        else:
            for s in self.carried:
                (self.waiting if s.produced < s.target_len else self.done.setdefault(s.group, [])).append(s)
            self.carried = []
            self.new_groups(d.started_groups - len(self.open_groups))
        wanted = work.groups
        complete: list[list[Sample]] = []
        for g in [g for g, v in self.done.items() if len(v) == work.samples][:wanted]:
            complete.append(self.done.pop(g))
        spent, prefill = np.zeros(4), 0
        leaders: set[int] = set()  # groups whose prompt is computed under this version (prefix cache)
        while len(complete) < wanted:
            full = d.max_num_seqs - len(self.running) < d.admit_seats
            while self.waiting and len(self.running) < d.max_num_seqs and not (full and self.running):
                s = self.waiting.popleft()
                if s.needs_prefill:
                    tokens = s.produced + (0 if s.group in leaders else s.prompt_len)
                    leaders.add(s.group)
                    prefill += tokens
                    spent[3] += tokens
                    s.needs_prefill = False
                self.running.append(s)
            if not self.running:
                break
            remaining = np.array([s.target_len - s.produced for s in self.running])
            context = sum(s.prompt_len + s.produced for s in self.running)
            k = int(remaining.min())
            spent += decode_work(k, len(self.running), context)
            still = []
            for s, left in zip(self.running, remaining):
                s.produced += k
                if left > k:
                    still.append(s)
                    continue
                self.close_segment(s)
                group = self.done.setdefault(s.group, [])
                group.append(s)
                if len(group) == work.samples and len(complete) < wanted:
                    complete.append(self.done.pop(s.group))
            self.running = still
        for g in complete:
            self.open_groups.discard(g[0].group)
        trained = [s for g in complete for s in g]
        lags = np.concatenate([self.version - np.array(s.versions) for s in trained]) if trained else np.zeros(0)
        unfinished = [*self.running, *self.waiting]
        partial_samples = unfinished + [s for v in self.done.values() for s in v]
        leftover = sum(s.produced for s in partial_samples)
        thrown = carried = 0
        if d.mode == "oversample":
            thrown = leftover
            self.running, self.waiting, self.done, self.open_groups = [], deque(), {}, set()
        elif d.mode == "partial":
            carried = leftover
            for s in unfinished:
                self.close_segment(s)
                s.needs_prefill = True
            self.carried = partial_samples
            self.running, self.waiting, self.done = [], deque(), {}
        elif d.mode == "keep":
            carried = leftover
            for s in self.running:
                self.close_segment(s)
        self.version += 1
        return StepResult(spent, sum(s.produced for s in trained), thrown, carried, prefill,
                          float((lags > 0).mean()) if len(lags) else 0.0, int(lags.max()) if len(lags) else 0)


def simulate(work: Workload, design: Design, steps: int, warmup: int, seed: int = 0) -> list[StepResult]:
    """The timed steps (after `warmup` steps) of one simulated run."""
    sim = Simulator(work, design, seed)
    return [sim.step() for _ in range(warmup + steps)][warmup:]


def summary(design: Design, runs: list[list[StepResult]], cost: StepCost) -> dict:
    """Per-step means over every run's timed steps, with seconds from `cost`."""
    rows = [r for run in runs for r in run]
    seconds = sum(float(r.work @ cost.vector()) for r in rows)
    trained = sum(r.trained_tokens for r in rows)
    return {"design": design.label(), "seconds_per_step": seconds / len(rows), "trained_tokens_per_step": trained / len(rows),
            "us_per_trained_token": 1e6 * seconds / trained,
            "decode_steps_per_step": statistics.mean(r.work[0] for r in rows),
            "thrown_away_per_step": statistics.mean(r.thrown_away for r in rows),
            "carried_per_step": statistics.mean(r.carried for r in rows),
            "stale_share": statistics.mean(r.stale_share for r in rows), "max_lag": max(r.max_lag for r in rows)}


def measured_steps(path: Path) -> list[tuple[Design, int, float]]:
    """(design, step index, seconds) of each warm step in an async_rollout JSON: either layout, the first
    (plain / oversample / partial, max_num_seqs = G x n, partial's pool = G) or the steady-state one (keep too,
    `max_num_seqs`, `pool`, `admit_seats` and each mode's untimed `warmup_steps` recorded)."""
    res = json.loads(path.read_text())
    args = res["args"]
    groups = args["oversample_groups"]
    if "max_num_seqs" in args:
        cap = args["max_num_seqs"]
        extra = {"admit_seats": args.get("admit_seats") or max(1, cap // 16)}  # generate_groups' default
        pool = args["pool"]
    else:
        cap, extra, pool = groups * args["samples"], {}, groups
    designs = {"plain": Design("plain", cap, **extra), "oversample": Design("oversample", cap, groups, **extra),
               "partial": Design("partial", cap, pool, **extra), "keep": Design("keep", cap, pool, **extra)}
    return [(design, row["step"], row["seconds"]) for mode, design in designs.items()
            for row in res.get(mode, {}).get("steps", [])
            if row["step"] >= res[mode].get("warmup_steps", 0)  # the pool still filling
            and not (mode == "plain" and row["step"] == 0)]  # plain's first step compiles the kernels


def fit(path: Path, work: Workload, cost: StepCost, free: list[str], seeds: int) -> StepCost:
    """Least squares for the `free` terms of `cost` over the measured warm steps (seconds are linear in every
    term), each step's work the mean over `seeds` simulated runs; the other terms stay as they are."""
    names = list(asdict(cost))
    rows = measured_steps(path)
    work_rows = np.array([np.mean([simulate(work, d, 1, step, s)[0].work for s in range(seeds)], axis=0)
                          for d, step, _ in rows])
    measured = np.array([r[2] for r in rows])
    fixed = [n for n in names if n not in free]
    known = work_rows[:, [names.index(n) for n in fixed]] @ np.array([getattr(cost, n) for n in fixed])
    solution, *_ = np.linalg.lstsq(work_rows[:, [names.index(n) for n in free]], measured - known, rcond=None)
    fitted = replace(cost, **dict(zip(free, map(float, solution))))
    for (design, step, seconds), w in zip(rows, work_rows):
        model = float(w @ fitted.vector())
        print(f"fit check  {design.label():26s} step {step}: measured {seconds:6.2f} s, model {model:6.2f} s")
    return fitted


CANDIDATES = [  # the benchmark's modes first (max_num_seqs 512 = K x n), then the last run's, then other settings
    Design("plain", 512), Design("oversample", 512, 80), Design("partial", 512, 192), Design("keep", 512, 192),
    Design("plain", 640), Design("oversample", 640, 80), Design("partial", 640, 80),
    Design("keep", 512, 96), Design("partial", 512, 128), Design("keep", 512, 128), Design("keep", 512, 160),
    Design("keep", 512, 256),
    Design("plain", 256), Design("keep", 256, 64), Design("keep", 256, 96), Design("keep", 256, 128),
    Design("keep", 1024, 256),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fit", type=Path, help="an async_rollout JSON whose warm steps fit the --free terms")
    ap.add_argument("--free", nargs="+", default=["per_seq"], choices=list(asdict(StepCost())))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work, cost = Workload(), StepCost()
    if args.fit:
        cost = fit(args.fit, work, cost, args.free, args.seeds)
    print("cost model:", json.dumps(asdict(cost)))
    rows = [summary(d, [simulate(work, d, args.steps, args.warmup, s) for s in range(args.seeds)], cost)
            for d in CANDIDATES]
    plain = {r["design"].rsplit("cap=", 1)[1]: r for r in rows if r["design"].startswith("plain")}  # by cap
    for r in rows:
        same_cap = plain.get(r["design"].rsplit("cap=", 1)[1], rows[0])
        r["vs_plain_cap512_per_trained_token"] = rows[0]["us_per_trained_token"] / r["us_per_trained_token"]
        r["vs_plain_same_cap_per_trained_token"] = same_cap["us_per_trained_token"] / r["us_per_trained_token"]
        print(f"{r['design']:34s} {r['seconds_per_step']:6.2f} s/step {r['trained_tokens_per_step']:7.0f} trained "
              f"{r['us_per_trained_token']:5.1f} us/tok  x{r['vs_plain_cap512_per_trained_token']:.2f} "
              f"(same cap x{r['vs_plain_same_cap_per_trained_token']:.2f})  {r['decode_steps_per_step']:5.0f} steps  "
              f"thrown {r['thrown_away_per_step']:6.0f} carried {r['carried_per_step']:6.0f} "
              f"stale {r['stale_share']:.2f} lag<={r['max_lag']}")
    if args.out:
        args.out.write_text(json.dumps({"cost": asdict(cost), "workload": asdict(work), "predictions": rows}, indent=1))


if __name__ == "__main__":
    main()
