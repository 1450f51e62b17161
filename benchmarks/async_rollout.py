"""An RL step with a long tail: plain `generate` vs over-sampling (the first K of G groups) vs partial
rollouts carried to the next step across a weight update; and the latency of an in-flight weight update.

Model: random init with Qwen3-0.6B's shapes, bf16, written by parity's factory. Workload per RL step:
64 prompts x 8 samples at T=1, prompts of U[32, 256] random token ids. Sample lengths are geometric: a
random set of stop token ids, sized so that a token is one of them with probability 1/mean_len on a
near-uniform distribution (the measured lengths are reported), capped by max_tokens=4096. Between steps
the trainer's update is simulated by `update_weights` with the weights slightly scaled (a new version).
  plain:     generate(64 prompts, n=8); every token is trained.
  oversample: generate_groups(G=80 prompts, n=8, K=64): the first 64 complete groups are trained, the
             rest is thrown away.
  partial:   generate_groups(K=64) over the groups carried from the last step (they continue where they
             were cut, now under newer weights) plus new prompts up to G=80; nothing decoded is thrown away.
Per step: wall seconds, tokens trained / thrown away / carried, and staleness of the trained tokens (share
of tokens sampled under an older weight version than the step's, mean and max version lag). Also: the
latency of update_weights(in_flight="keep" | "recompute") with 512 samples decoding, from the call until
every running sample has sampled its next token.

  python -m benchmarks.async_rollout --out $OUT          # on the GPU; writes async_rollout.json
  python -m benchmarks.async_rollout --smoke             # tiny model on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import asdict, replace
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


def run_mode(mode: str, engine: Engine, trainer: Trainer, prompt_stream, params: SamplingParams, args, clock: Clock) -> dict:
    rows, carried = [], []
    for step in range(args.steps):
        start = clock.now()
        if mode == "plain":
            rollouts = engine.generate([next(prompt_stream) for _ in range(args.groups)], params)
            complete = [rollouts[i : i + params.n] for i in range(0, len(rollouts), params.n)]
            partial: list[Rollout] = []
        else:
            num_new = args.oversample_groups - len({r.request_id for r in carried})
            prompts = [next(prompt_stream) for _ in range(num_new)]
            complete, partial = engine.generate_groups(prompts, params, args.groups, carried=carried)
        seconds = clock.now() - start
        trained = [r for g in complete for r in g]
        row = {"step": step, "seconds": seconds, "groups": len(complete),
               "tokens_trained": sum(len(r.output_ids) for r in trained),
               "lengths": lengths(trained), **staleness(complete, engine.weight_version)}
        partial_tokens = sum(len(r.output_ids) for r in partial)
        if mode == "partial":
            carried = partial
            row["tokens_carried"], row["tokens_thrown_away"] = partial_tokens, 0
        else:
            row["tokens_carried"], row["tokens_thrown_away"] = 0, partial_tokens
        t0 = clock.now()
        engine.update_weights(trainer.weights())  # the trainer's step, then the sync (the engine is idle here)
        row["update_s"] = clock.now() - t0
        rows.append(row)
        print(mode, json.dumps(row), flush=True)
    engine.abort_all()
    timed = rows[1:] if len(rows) > 1 else rows  # the first step of a mode warms up (and starts with nothing carried)
    trained = sum(r["tokens_trained"] for r in timed)
    seconds = sum(r["seconds"] for r in timed)
    return {"steps": rows, "seconds_per_step": seconds / len(timed), "trained_tokens_per_s": trained / seconds,
            "tokens_thrown_away_per_step": statistics.mean(r["tokens_thrown_away"] for r in timed)}


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
    ap.add_argument("--oversample-groups", type=int, default=80, help="G: groups started per step (over-sampling)")
    ap.add_argument("--samples", type=int, default=8, help="n: samples per group")
    ap.add_argument("--mean-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["plain", "oversample", "partial"])
    args = ap.parse_args()
    spec, device, prompt_lens = replace(QWEN3_06B, max_position_embeddings=8192), "cuda", (32, 256)
    if args.smoke:
        args.groups, args.oversample_groups, args.samples, args.mean_len, args.max_tokens = 4, 6, 3, 6, 24
        args.steps = 2
        spec, device, prompt_lens = SMOKE, "cpu", (4, 12)
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "async_rollout.json"
    clock = Clock(torch.device(device))
    results: dict = {**run_env(device, args), "spec": asdict(spec)}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_model(Path(tmp) / "model", spec)
        engine = Engine.from_pretrained(
            path, device=device, dtype="bf16" if device == "cuda" else "fp32",
            max_model_len=prompt_lens[1] + args.max_tokens, max_num_seqs=args.oversample_groups * args.samples,
        )
        trainer = Trainer(engine)
        vocab = engine.model_config.vocab_size
        params = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True,
                                stop_token_ids=stop_set(vocab, args.mean_len, seed=0))
        for mode in args.modes:
            stream = iter(random_prompts(10_000, vocab, *prompt_lens, seed=1))  # every mode sees the same prompts
            results[mode] = run_mode(mode, engine, trainer, stream, params, args, clock)
            free_memory(device)
            out_file.write_text(json.dumps(results, indent=1))  # what is done so far survives a timeout
        if "plain" in results:
            base = results["plain"]["seconds_per_step"]
            results["speedup_seconds_per_step"] = {m: base / results[m]["seconds_per_step"] for m in args.modes}
            base_rate = results["plain"]["trained_tokens_per_s"]
            results["speedup_trained_tokens_per_s"] = {m: results[m]["trained_tokens_per_s"] / base_rate
                                                       for m in args.modes}
        prompts = random_prompts(args.groups, vocab, *prompt_lens, seed=2)
        results["inflight_update"] = [inflight_update_latency(engine, trainer, prompts, params, m, clock)
                                      for m in ("keep", "recompute")]
        print(json.dumps(results["inflight_update"], indent=1), flush=True)
        results["kv_blocks_used_at_end"] = engine.kv_cache_usage()["used_blocks"]
    out_file.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results.get(k) for k in ("speedup_seconds_per_step", "speedup_trained_tokens_per_s")}))


if __name__ == "__main__":
    main()
