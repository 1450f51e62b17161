"""An RL step with a long tail: plain `generate` vs over-sampling (the first K of G groups) vs partial rollouts
carried to the next step, the engine kept full, with a weight update at every step boundary; and the latency of
an in-flight weight update.

Model: random init with Qwen3-0.6B's shapes, bf16, written by parity's factory. Workload per RL step: the
trainer takes K=64 groups of n=8 samples at T=1, prompts of U[32, 256] random token ids. Sample lengths are
geometric: a random set of stop token ids (the measured lengths are reported), capped by max_tokens=4096.
Every mode runs on one engine with max_num_seqs=512 (= K x n: plain admits its whole step at once). Between
steps the trainer's update is simulated by `update_weights` with the weights slightly scaled (a new version).
  plain:      generate(K prompts, n=8); every token is trained.
  oversample: generate_groups(G=80 prompts, K): the first K complete groups are trained, the rest thrown away.
  partial:    what verl's and slime's partial rollouts do in steady state: the pool is topped up to P groups
              (--pool, default 3K; those beyond max_num_seqs wait for seats and join the batch in bursts of
              --admit-seats, so the engine stays full and most steps are pure decode steps); the
              step ends as soon as K groups are complete; the samples still running or waiting are aborted
              with what they generated, the update lands on the idle engine, and next step they continue
              first in line (continue_from, their KV recomputed under the new weights) beside new prompts.
  keep:       the same pool, but the unfinished samples stay in flight through update_weights(in_flight="keep")
              (PipelineRL's choice: they go on from their KV cache), so nothing is recomputed.
Nothing decoded is thrown away in partial and keep. Per step: wall seconds (generation + update), tokens
trained / generated / thrown away / carried, and staleness of the trained tokens (share sampled under an older
weight version than the step's, mean and max lag). A short generate compiles the kernels first; partial and
keep run --warmup untimed steps to fill their pool. The comparison is per trained token (seconds per step at
plain's trained tokens), since a step's trained tokens vary. benchmarks/rl_step_model.py predicts each mode's
figures from a cost model of the engine step.
Also: the latency of update_weights(in_flight="keep" | "recompute") with 512 samples decoding, from the call
until every running sample has sampled its next token.

  python -m benchmarks.async_rollout --out $OUT --time-budget 190   # on the GPU; writes async_rollout.json
  python -m benchmarks.async_rollout --smoke                        # tiny model on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import free_memory, run_env
from benchmarks.throughput import QWEN3_06B, SMOKE, Clock, random_prompts
from parity import Engine, Rollout, SamplingParams
from parity.models.weights import hf_named_weights
from parity.testing.factory import write_tiny_model


def stop_set(vocab: int, mean_len: int, seed: int) -> list[int]:
    """Token ids that end a sample with probability ~1/mean_len per token on a near-uniform distribution."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(vocab, size=max(1, vocab // mean_len), replace=False).tolist())


class Trainer:
    """Stands in for the optimizer step: every update hands the engine its weights scaled a little."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.base = {k: v.clone() for k, v in hf_named_weights(engine.model)}
        self.version = 0

    def weights(self) -> dict[str, torch.Tensor]:
        self.version += 1
        scale = 1.0 + 1e-3 * (self.version % 2)
        return {k: v * scale for k, v in self.base.items()}


def staleness(groups: list[list[Rollout]], version: int) -> dict:
    lags = [version - v for g in groups for r in g for v in r.output_weight_versions]
    if not lags:
        return {"stale_token_share": 0.0, "mean_version_lag": 0.0, "max_version_lag": 0}
    return {"stale_token_share": sum(lag > 0 for lag in lags) / len(lags),
            "mean_version_lag": statistics.mean(lags), "max_version_lag": max(lags)}


def lengths(rollouts: list[Rollout]) -> dict:
    lens = sorted(len(r.output_ids) for r in rollouts)
    return {"mean": statistics.mean(lens), "p50": lens[len(lens) // 2], "p99": lens[int(0.99 * (len(lens) - 1))],
            "max": lens[-1]} if lens else {}


@dataclass
class Pool:
    """The groups a streaming mode has started and not yet trained, and the partial rollouts to carry."""

    open_groups: int = 0
    carried: list[Rollout] = field(default_factory=list)


def one_step(mode: str, engine: Engine, trainer: Trainer, prompt_stream, params: SamplingParams, args,
             pool: Pool) -> tuple[list[list[Rollout]], dict]:
    """One RL step of `mode` (generation, then the update): the trained groups and the step's token counts."""
    if mode == "plain":
        rollouts = engine.generate([next(prompt_stream) for _ in range(args.groups)], params)
        complete = [rollouts[i : i + params.n] for i in range(0, len(rollouts), params.n)]
        engine.update_weights(trainer.weights())
        return complete, {"tokens_thrown_away": 0, "tokens_carried": 0}
    if mode == "oversample":
        prompts = [next(prompt_stream) for _ in range(args.oversample_groups)]
        complete, partial = engine.generate_groups(prompts, params, args.groups)
        engine.update_weights(trainer.weights())
        return complete, {"tokens_thrown_away": sum(len(r.output_ids) for r in partial), "tokens_carried": 0}
    carried_in = sum(len(r.output_ids) for r in pool.carried) + in_flight_tokens(engine)
    new = [next(prompt_stream) for _ in range(args.pool - pool.open_groups)]
    unfinished = "keep" if mode == "keep" else "abort"
    complete, pool.carried = engine.generate_groups(new, params, args.groups, carried=pool.carried,
                                                    unfinished=unfinished, admit_seats=args.admit_seats)
    pool.open_groups += len(new) - len(complete)
    carried_out = sum(len(r.output_ids) for r in pool.carried) + in_flight_tokens(engine)
    engine.update_weights(trainer.weights(), in_flight="keep" if mode == "keep" else None)
    trained = sum(len(r.output_ids) for g in complete for r in g)
    return complete, {"tokens_thrown_away": 0, "tokens_carried": carried_out,
                      "tokens_generated": trained + carried_out - carried_in}


def in_flight_tokens(engine: Engine) -> int:
    """Tokens the samples still in the engine have generated (the keep mode's carried work)."""
    return sum(len(s.output_ids) for s in [*engine.scheduler.running, *engine.scheduler.waiting])


def run_mode(mode: str, engine: Engine, trainer: Trainer, prompt_stream, params: SamplingParams, args, clock: Clock,
             deadline: float, warmup: int) -> dict:
    rows, pool = [], Pool()
    for step in range(warmup + args.steps):
        if clock.now() > deadline and len(rows) > warmup:
            break  # out of time: what ran is reported
        start = clock.now()
        version = engine.weight_version  # the step's policy: its trained tokens' lag is measured against it
        ahead = engine.pipeline.num_ahead_used, engine.pipeline.num_ahead_discarded
        complete, counts = one_step(mode, engine, trainer, prompt_stream, params, args, pool)
        seconds = clock.now() - start
        trained = [r for g in complete for r in g]
        row = {"step": step, "seconds": seconds, "groups": len(complete),
               "tokens_trained": sum(len(r.output_ids) for r in trained), **counts,
               "look_ahead_used": engine.pipeline.num_ahead_used - ahead[0],  # async scheduling's queued steps
               "look_ahead_discarded": engine.pipeline.num_ahead_discarded - ahead[1],
               "lengths": lengths(trained), **staleness(complete, version)}
        rows.append(row)
        print(mode, json.dumps(row), flush=True)
    engine.abort_all()
    timed = rows[warmup:] or rows
    trained = sum(r["tokens_trained"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    return {"steps": rows, "warmup_steps": warmup, "timed_steps": len(timed), "seconds_per_step": seconds / len(timed),
            "trained_tokens_per_step": trained / len(timed), "us_per_trained_token": 1e6 * seconds / trained,
            "trained_tokens_per_s": trained / seconds,
            "tokens_thrown_away_per_step": statistics.mean(r["tokens_thrown_away"] for r in timed),
            "tokens_carried_per_step": statistics.mean(r["tokens_carried"] for r in timed),
            "stale_token_share": statistics.mean(r["stale_token_share"] for r in timed),
            "max_version_lag": max(r["max_version_lag"] for r in timed)}


def inflight_update_latency(engine: Engine, trainer: Trainer, prompts, params: SamplingParams, mode: str,
                            clock: Clock) -> dict:
    """Seconds from update_weights(in_flight=mode) with every sample decoding until each has sampled again."""
    for i, p in enumerate(prompts):
        engine.add_request(p, replace(params, stop_token_ids=[]), request_id=f"lat-{mode}-{i}")
    sched = engine.scheduler
    while sched.waiting or any(s.in_prefill for s in sched.running):
        engine.step()
    for _ in range(8):
        engine.step()
    running = list(sched.running)
    counts = {s.seq_id: len(s.output_ids) for s in running}
    weights = trainer.weights()
    start = clock.now()
    engine.update_weights(weights, in_flight=mode)
    call_s = clock.now() - start
    steps = 0
    while any(len(s.output_ids) == counts[s.seq_id] for s in running):
        engine.step()
        steps += 1
    total_s = clock.now() - start
    engine.abort_all()
    return {"mode": mode, "running_samples": len(running), "update_call_s": call_s,
            "until_every_sample_sampled_again_s": total_s, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script")
    ap.add_argument("--groups", type=int, default=64, help="K: groups trained per RL step")
    ap.add_argument("--oversample-groups", type=int, default=80, help="G: groups started per step (oversample)")
    ap.add_argument("--pool", type=int, default=192, help="P: groups started and not yet trained (partial, keep)")
    ap.add_argument("--samples", type=int, default=8, help="n: samples per group")
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--admit-seats", type=int, default=None,
                    help="partial, keep: a full batch admits more of the pool once this many seats are free "
                         "(default: generate_groups', max_num_seqs // 16)")
    ap.add_argument("--mean-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps of partial and keep, so their pool reaches its steady state")
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each mode")
    ap.add_argument("--modes", nargs="+", default=["plain", "keep", "partial", "oversample"],
                    choices=["plain", "oversample", "partial", "keep"])
    ap.add_argument("--time-budget", type=float, default=float("inf"),
                    help="seconds for all modes: a mode past it stops after its first timed step")
    args = ap.parse_args()
    spec, device, prompt_lens = replace(QWEN3_06B, max_position_embeddings=8192), "cuda", (32, 256)
    if args.smoke:
        args.groups, args.oversample_groups, args.pool, args.samples, args.max_num_seqs = 3, 4, 6, 2, 8
        args.mean_len, args.max_tokens, args.warmup, args.steps = 5, 16, 1, 1
        spec, device, prompt_lens = SMOKE, "cpu", (4, 12)
    if args.pool < args.groups or args.oversample_groups < args.groups:
        raise SystemExit(f"--pool ({args.pool}) and --oversample-groups ({args.oversample_groups}) must be at least "
                         f"--groups ({args.groups})")
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "async_rollout.json"
    clock = Clock(torch.device(device))
    deadline = clock.now() + args.time_budget
    results: dict = {**run_env(device, args), "spec": asdict(spec)}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp) / "model", spec)
        engine = Engine.from_pretrained(
            path, device=device, dtype="bf16" if device == "cuda" else "fp32",
            max_model_len=prompt_lens[1] + args.max_tokens, max_num_seqs=args.max_num_seqs,
        )
        results["kv_blocks"] = engine.kv_cache_usage()["num_blocks"]
        trainer = Trainer(engine)
        vocab = engine.model_config.vocab_size
        params = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True,
                                stop_token_ids=stop_set(vocab, args.mean_len, seed=0))
        start = clock.now()  # compiles the kernels: the step's shapes and sampling, on prompts no mode sees
        engine.generate(random_prompts(args.groups, vocab, *prompt_lens, seed=3), replace(params, max_tokens=64))
        results["compile_warmup_s"] = clock.now() - start
        for mode in args.modes:
            stream = iter(random_prompts(10_000, vocab, *prompt_lens, seed=1))  # every mode sees the same prompts
            warmup = args.warmup if mode in ("partial", "keep") else 0
            results[mode] = run_mode(mode, engine, trainer, stream, params, args, clock, deadline, warmup)
            free_memory(device)
            out_file.write_text(json.dumps(results, indent=1))  # what is done so far survives a timeout
        if "plain" in results:
            plain = results["plain"]
            results["vs_plain"] = {m: {
                "per_trained_token": plain["us_per_trained_token"] / results[m]["us_per_trained_token"],
                "per_step": plain["seconds_per_step"] / results[m]["seconds_per_step"],
                "seconds_per_step_at_plain_trained_tokens":
                    1e-6 * results[m]["us_per_trained_token"] * plain["trained_tokens_per_step"]}
                for m in args.modes}
        prompts = random_prompts(args.max_num_seqs // args.samples, vocab, *prompt_lens, seed=2)
        results["inflight_update"] = [inflight_update_latency(engine, trainer, prompts, params, m, clock)
                                      for m in ("keep", "recompute")]
        print(json.dumps(results["inflight_update"], indent=1), flush=True)
        results["kv_blocks_used_at_end"] = engine.kv_cache_usage()["used_blocks"]
    out_file.write_text(json.dumps(results, indent=1))
    print(json.dumps(results.get("vs_plain"), indent=1))


if __name__ == "__main__":
    main()
