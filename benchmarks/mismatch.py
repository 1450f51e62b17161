"""Rollout/trainer logprob mismatch in fp16 and bf16, and what deterministic mode costs.

For each dtype, on the same prompts (random token ids, seeded), sampling at temperature 1 with seeds:
  (a) parity fast mode       vs HF transformers forward in the same dtype (the usual trainer)
  (b) parity fast mode       vs parity's trainer-side parity forward (deterministic kernels, no KV cache)
  (c) deterministic mode     vs parity forward: expected exactly 0 (max |Δlogp| == 0.0 on every token)
Each pair scores the engine's own samples, recomputed by the other side at the same temperature with
`parity diagnose run`'s code (`parity.diagnostics.recompute`); metrics are
`parity.precision.metrics.mismatch_metrics` (verl / TRL meanings). Then the throughput of fast vs
deterministic mode on the throughput benchmark's workload A (prompts U[100, 1024], fixed output length,
greedy, EOS ignored, CUDA graphs on).

Model: random init with Qwen3-0.6B's shapes, `--init-range` sets how peaked its distributions are; or
`--model DIR` for any HF-format checkpoint.

  python -m benchmarks.mismatch --out results/          # on the GPU
  python -m benchmarks.mismatch --tiny --out /tmp/mm    # tiny model on CPU: checks the script
Writes mismatch.json and mismatch.md (tables) into --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from benchmarks.common import free_memory, run_env
from benchmarks.throughput import QWEN3_06B, Clock, random_prompts, run_parity
from parity import Engine, SamplingParams
from parity.diagnostics.recompute import load_hf_model, recompute_logprobs
from parity.models.loader import Checkpoint
from parity.precision.metrics import mismatch_metrics
from parity.testing.factory import TinyModelSpec, write_tiny_model
from parity.trainer.parity_model import parity_model_from_engine

TINY = TinyModelSpec(architecture="qwen3", head_dim=16)
SUMMARY_KEYS = ("logp_abs_diff_mean", "logp_abs_diff_max", "mismatch_k3_kl", "ratio_fraction_outside", "prob_pearson")
DTYPES = ("fp16", "bf16", "fp32")


def make_engine(path: Path, args, dtype: str, deterministic: bool) -> Engine:
    return Engine.from_pretrained(path, device=args.device, dtype=dtype, deterministic=deterministic,
                                  max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)


def scores(model, rollouts, args) -> list[torch.Tensor]:
    """The trainer side's logprobs of the rollouts' tokens (`parity diagnose run`'s recomputation)."""
    values = recompute_logprobs(model, [r.prompt_ids for r in rollouts], [r.output_ids for r in rollouts],
                                args.temperature, args.micro_batch)
    return [torch.tensor(v) for v in values]


def compare(rollouts, scored) -> dict:
    engine_lp = [torch.tensor(r.output_logprobs) for r in rollouts]
    metrics = mismatch_metrics(engine_lp, scored, prefix="")
    diff = torch.cat([(a - b.float()).abs() for a, b in zip(engine_lp, scored)])
    metrics["tokens_not_bitwise_equal"] = int((diff != 0).sum())
    return metrics


def mismatch_suite(path: Path, args, dtype: str, prompts, clock: Clock) -> dict:
    device = torch.device(args.device)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=1234, ignore_eos=True)
    res: dict = {}
    engine = make_engine(path, args, dtype, deterministic=False)
    t0 = clock.now()
    fast = engine.generate(prompts, params)
    res["fast_generate_s"] = clock.now() - t0
    del engine
    free_memory(device)

    engine = make_engine(path, args, dtype, deterministic=True)
    t0 = clock.now()
    det = engine.generate(prompts, params)
    res["deterministic_generate_s"] = clock.now() - t0
    trainer = parity_model_from_engine(engine, deterministic=True, trainable=False)
    del engine
    free_memory(device)
    t0 = clock.now()
    res["b_fast_vs_parity_forward"] = compare(fast, scores(trainer, fast, args))
    res["c_deterministic_vs_parity_forward"] = compare(det, scores(trainer, det, args))
    res["parity_forward_s"] = clock.now() - t0
    del trainer
    free_memory(device)
    if "hf" not in args.skip:
        t0 = clock.now()
        hf = load_hf_model(Checkpoint.resolve(path), dtype, device)
        res["a_fast_vs_hf"] = compare(fast, scores(hf, fast, args))
        res["hf_forward_s"] = clock.now() - t0
        del hf
        free_memory(device)
    res["bitwise_c"] = res["c_deterministic_vs_parity_forward"]["tokens_not_bitwise_equal"] == 0
    res["num_tokens"] = sum(len(r.output_ids) for r in det)
    return res


def throughput_suite(path: Path, args, dtype: str, prompts, max_tokens: list[int], clock: Clock) -> dict:
    """Fast and deterministic mode in turn, twice (fast, det, fast, det), each on a fresh engine; the faster
    of each mode's two runs counts, so neither mode pays alone for first-run effects (allocator, clocks)."""
    runs: dict[str, list[dict]] = {"fast": [], "deterministic": []}
    for _ in range(2):
        for mode, deterministic in (("fast", False), ("deterministic", True)):
            engine = make_engine(path, args, dtype, deterministic)
            run_parity(engine, prompts[: min(8, len(prompts))], [8] * min(8, len(prompts)), clock)  # warm-up: compile
            runs[mode].append(run_parity(engine, prompts, max_tokens, clock))
            print(dtype, mode, json.dumps(runs[mode][-1]), flush=True)
            del engine
            free_memory(args.device)
    res = {mode: min(r, key=lambda x: x["seconds"]) for mode, r in runs.items()}
    res["seconds_all_runs"] = {mode: [x["seconds"] for x in r] for mode, r in runs.items()}
    res["deterministic_slowdown"] = res["deterministic"]["seconds"] / res["fast"]["seconds"]
    return res


def markdown(results: dict) -> str:
    lines = [f"# Rollout/trainer mismatch ({results['device']}, {results['date']})", "",
             f"Model: {results['model']}; {results['args']['num_prompts']} prompts, {results['args']['max_tokens']} "
             f"sampled tokens each, temperature {results['args']['temperature']}.", "",
             "| dtype | pair | tokens | " + " | ".join(SUMMARY_KEYS) + " | tokens ≠ bitwise |",
             "|---|---|---|" + "---|" * len(SUMMARY_KEYS) + "---|"]
    pairs = {"a_fast_vs_hf": "(a) fast vs HF", "b_fast_vs_parity_forward": "(b) fast vs parity forward",
             "c_deterministic_vs_parity_forward": "(c) deterministic vs parity forward"}
    for dtype, res in results["mismatch"].items():
        for key, label in pairs.items():
            if key in res:
                m = res[key]
                cells = " | ".join(f"{m[k]:.3g}" for k in SUMMARY_KEYS)
                lines.append(f"| {dtype} | {label} | {int(m['num_tokens'])} | {cells} | {m['tokens_not_bitwise_equal']} |")
    if results.get("fp16_vs_bf16"):
        lines += ["", "bf16 / fp16 ratio of mean |Δlogp| (higher = fp16 better): "
                  + ", ".join(f"{k}: {v:.3g}" for k, v in results["fp16_vs_bf16"].items())]
    if results.get("throughput"):
        lines += ["", "| dtype | fast tok/s | deterministic tok/s | deterministic slowdown |", "|---|---|---|---|"]
        for dtype, res in results["throughput"].items():
            lines.append(f"| {dtype} | {res['fast']['output_tok_s']:.1f} | {res['deterministic']['output_tok_s']:.1f} | "
                         f"{res['deterministic_slowdown']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU, to check the script")
    ap.add_argument("--model", type=Path, help="HF model directory (default: random init, Qwen3-0.6B shapes)")
    ap.add_argument("--init-range", type=float, default=0.05, help="std of the random init (larger = peakier)")
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=DTYPES)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per trainer-side forward")
    ap.add_argument("--throughput-prompts", type=int, default=256)
    ap.add_argument("--throughput-output-len", type=int, default=512)
    ap.add_argument("--throughput-dtypes", nargs="*", default=["bf16"], choices=DTYPES)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--skip", nargs="*", default=[], choices=["hf", "throughput"])
    args = ap.parse_args()
    t_start = time.perf_counter()
    spec = replace(QWEN3_06B, initializer_range=args.init_range)
    prompt_range = (100, 1024)
    if args.tiny:
        args.device = "cpu"
        args.num_prompts, args.max_tokens, args.throughput_prompts, args.throughput_output_len = 6, 12, 6, 8
        args.max_num_seqs, args.max_model_len = 8, 256
        spec, prompt_range = TINY, (10, 40)
    else:
        args.device = "cuda"
    device = torch.device(args.device)
    clock = Clock(device)
    results: dict = {**run_env(device, args), "mismatch": {}, "throughput": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            path, results["model"] = args.model, str(args.model)
        else:
            path = write_tiny_model(Path(tmp) / "model", spec if device.type == "cuda" else replace(spec, init_device="cpu"))
            results["model"] = f"random init {spec.architecture} (hidden {spec.hidden_size}, {spec.num_layers} layers, " \
                               f"init std {spec.initializer_range})"
            results["spec"] = asdict(spec)
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        prompts = random_prompts(args.num_prompts, vocab, prompt_range[0], min(prompt_range[1], args.max_model_len // 2),
                                 seed=0)
        for dtype in args.dtypes:
            results["mismatch"][dtype] = res = mismatch_suite(path, args, dtype, prompts, clock)
            print(dtype, json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}), flush=True)
            for key in ("a_fast_vs_hf", "b_fast_vs_parity_forward", "c_deterministic_vs_parity_forward"):
                if key in res:
                    print(" ", key, {k: res[key][k] for k in SUMMARY_KEYS}, flush=True)
        mm = results["mismatch"]
        if "fp16" in mm and "bf16" in mm:
            results["fp16_vs_bf16"] = {
                key: mm["bf16"][key]["logp_abs_diff_mean"] / max(mm["fp16"][key]["logp_abs_diff_mean"], 1e-30)
                for key in ("a_fast_vs_hf", "b_fast_vs_parity_forward") if key in mm["fp16"] and key in mm["bf16"]
            }
        if "throughput" not in args.skip:
            tp_prompts = random_prompts(args.throughput_prompts, vocab, prompt_range[0],
                                        min(prompt_range[1], args.max_model_len - args.throughput_output_len), seed=0)
            for dtype in args.throughput_dtypes:
                results["throughput"][dtype] = throughput_suite(
                    path, args, dtype, tp_prompts, [args.throughput_output_len] * len(tp_prompts), clock)
    results["wall_s"] = time.perf_counter() - t_start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mismatch.json").write_text(json.dumps(results, indent=1))
    (args.out / "mismatch.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
