"""Distributed rollout on one host: DP and TP throughput against one GPU, and TP logprob equality.

  torchrun --nproc-per-node 2 -m benchmarks.distributed_device --out results/    # 2 GPUs (H100 x2 / H200 x2)
  torchrun --nproc-per-node 2 -m benchmarks.distributed_device --smoke           # CPU + gloo: checks the script

Workload: throughput.py's workload A — a random-init model with Qwen3-0.6B's shapes in bf16, 256
prompts of random token ids with lengths U[100, 1024] (seeded), 512 output tokens each, EOS ignored,
greedy. Rows, all on the same prompts in the same job:
  1 GPU      one Engine on rank 0's GPU (CUDA graphs, and eager: TP runs eager, so both are shown)
  DP=N       DataParallelRollout: every rank's Engine takes 1/N of the prompts, rollouts all-gathered
  TP=N       TPEngine: the model split over N GPUs (eager; --tp-cuda-graphs also tries graphs)
Throughput is output tokens over the wall time from a barrier before `generate` to its return on
every rank (DP includes the gather).

Equality (fp32, and bf16 for information): K prompts, greedy. Teacher-forced logprobs of the 1-GPU
model's sequences scored by the TP model against the 1-GPU model's own (same tokens, so any
difference is rounding), and the engines' greedy tokens side by side (first divergence, if any).
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import run_env, workload_parser
from benchmarks.throughput import QWEN3_06B, SMOKE, random_prompts, weight_bytes
from parity import Engine, SamplingParams
from parity.diagnostics.recompute import recompute_logprobs
from parity.distributed import DataParallelRollout, TPEngine, init_distributed
from parity.testing.factory import write_tiny_model


def barrier_clock(device: torch.device) -> float:
    """Every rank's work so far is done (device included); then the wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    return time.perf_counter()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def timed_generate(run, prompts, output_len: int, device: torch.device) -> dict:
    """Warm up on 8 short prompts, then time one generate() of the whole workload across all ranks."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    run([p[:32] for p in prompts[:8]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    free(device)
    start = barrier_clock(device)
    outs = run(prompts, params)
    seconds = barrier_clock(device) - start
    produced = sum(len(o.output_ids) for o in outs)
    assert not outs or produced == len(prompts) * output_len, "every request must produce exactly max_tokens tokens"
    peaks: list = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_gib(device))
    return {"output_tokens": produced, "seconds": seconds, "output_tok_s": produced / seconds, "peak_gib_per_rank": peaks}


def teacher_forced_logprobs(model, sequences: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Logprob of each output token given everything before it, one cache-free forward per sequence
    (`parity diagnose run`'s trainer-side recomputation)."""
    values = recompute_logprobs(model, [p for p, _ in sequences], [o for _, o in sequences], micro_batch=1)
    return [torch.tensor(v) for v in values]


def equality(path: Path, dtype: str, prompts, output_len: int, engine_kw: dict, device: torch.device) -> dict:
    """TP=N against one device: teacher-forced logprobs on the same tokens, and greedy tokens."""
    rank = dist.get_rank()
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    ref = [None, None]
    if rank == 0:
        single = Engine.from_pretrained(path, dtype=dtype, device=str(device), **engine_kw)
        rollouts = single.generate(prompts, params)
        sequences = [(r.prompt_ids, r.output_ids) for r in rollouts]
        ref = [rollouts, (sequences, teacher_forced_logprobs(single.model, sequences))]
        del single
        free(device)
    dist.broadcast_object_list(ref, src=0)
    single_rollouts, (sequences, single_logp) = ref
    tp = TPEngine.from_pretrained(path, dtype=dtype, **engine_kw)
    tp_logp = teacher_forced_logprobs(tp.model, sequences)
    tp_rollouts = tp.generate(prompts, params)
    del tp
    free(device)
    diffs = torch.cat([(a - b).abs() for a, b in zip(tp_logp, single_logp)])
    first_divergence = [
        next((i for i, (a, b) in enumerate(zip(x.output_ids, y.output_ids)) if a != b), None)
        for x, y in zip(tp_rollouts, single_rollouts)
    ]
    same = [x.output_ids == y.output_ids for x, y in zip(tp_rollouts, single_rollouts)]
    prefix_diffs = [
        abs(a - b)
        for x, y, d in zip(tp_rollouts, single_rollouts, first_divergence)
        for a, b in list(zip(x.output_logprobs, y.output_logprobs))[: d if d is not None else None]
    ]
    return {
        "dtype": dtype,
        "teacher_forced_max_abs_dlogp": diffs.max().item(),
        "teacher_forced_mean_abs_dlogp": diffs.mean().item(),
        "teacher_forced_bitwise_equal_fraction": (diffs == 0).double().mean().item(),
        "greedy_identical_sequences": f"{sum(same)}/{len(same)}",
        "greedy_first_divergence": first_divergence,
        "engine_max_abs_dlogp_before_divergence": max(prefix_diffs, default=0.0),
    }


def main() -> None:
    ap = workload_parser(__doc__, "tiny model on CPU over gloo, to check the script")
    ap.add_argument("--equality-prompts", type=int, default=16)
    ap.add_argument("--equality-output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--tp-cuda-graphs", action="store_true", help="also time TP with CUDA graphs (NCCL under capture)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["single", "dp", "tp", "equality"])
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    spec, lens, eq_lens, dtype = QWEN3_06B, (100, 1024), (100, 300), "bf16"
    if args.smoke:
        spec, lens, eq_lens, dtype = replace(SMOKE, init_device="cpu"), (10, 40), (10, 30), "fp32"
        args.num_prompts, args.output_len, args.equality_prompts, args.equality_output_len = 8, 8, 4, 8
        args.max_num_seqs, args.max_model_len = 8, 256
    if device.type != "cuda":
        spec = replace(spec, init_device="cpu")
    engine_kw = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len}
    if device.type != "cuda":
        engine_kw["kv_cache_memory"] = 64 << 20

    tmp = [tempfile.mkdtemp(prefix="parity-dist-") if rank == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    path = Path(tmp[0]) / "model"
    if rank == 0:
        write_tiny_model(path, spec)
    dist.barrier()
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = random_prompts(args.num_prompts, vocab, *lens, seed=0)
    results: dict = {**run_env(device, args), "world_size": world, "backend": dist.get_backend(), "rows": {}}
    rows = results["rows"]
    unit = "GPU" if device.type == "cuda" else "process"

    def record(name: str, row: dict) -> None:
        rows[name] = row
        if rank == 0:
            print(name, json.dumps(row), flush=True)

    if "single" not in args.skip:
        for eager in (False, True) if device.type == "cuda" else (True,):
            engine = None
            if rank == 0:
                engine = Engine.from_pretrained(path, dtype=dtype, device=str(device), enforce_eager=eager, **engine_kw)
            run = engine.generate if rank == 0 else (lambda prompts, params: [])
            row = timed_generate(run, prompts, args.output_len, device)
            if rank == 0:
                row["weight_gib_per_rank"] = weight_bytes(engine) / 2**30
            row = [row]  # only rank 0 generated: its numbers are the row
            dist.broadcast_object_list(row, src=0)
            record(f"1 {unit} ({'eager' if eager else 'CUDA graphs'})", row[0])
            del engine, run
            free(device)

    if "dp" not in args.skip:
        dp = DataParallelRollout(Engine.from_pretrained(path, dtype=dtype, device=str(device), **engine_kw))
        record(f"DP={world} (CUDA graphs)" if device.type == "cuda" else f"DP={world}",
               timed_generate(dp.generate, prompts, args.output_len, device))
        del dp
        free(device)

    if "tp" not in args.skip:
        for eager in (True, False) if args.tp_cuda_graphs and device.type == "cuda" else (True,):
            tp = TPEngine.from_pretrained(path, dtype=dtype, enforce_eager=eager, **engine_kw)
            row = timed_generate(tp.generate, prompts, args.output_len, device)
            row["weight_gib_per_rank"] = weight_bytes(tp) / 2**30
            record(f"TP={world} ({'eager' if eager else 'CUDA graphs'})", row)
            del tp
            free(device)

    if "equality" not in args.skip:
        eq_prompts = random_prompts(args.equality_prompts, vocab, *eq_lens, seed=1)
        results["equality"] = [
            equality(path, dt, eq_prompts, args.equality_output_len, engine_kw, device)
            for dt in (("fp32", "bf16") if device.type == "cuda" else ("fp32",))
        ]
        if rank == 0:
            for row in results["equality"]:
                print("equality", json.dumps(row), flush=True)

    results["wall_s"] = time.perf_counter() - t_start
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "distributed.json").write_text(json.dumps(results, indent=1))
        print(summary(results))
    dist.barrier()  # every rank is done with the model; also lets gloo's threads finish before exit
    if rank == 0:
        shutil.rmtree(tmp[0], ignore_errors=True)
    dist.destroy_process_group()


def summary(results: dict) -> str:
    rows = results["rows"]
    base = next((r["output_tok_s"] for name, r in rows.items() if name.startswith("1 ")), None)
    lines = [
        f"{results['date']}  {results['device']} x{results['world_size']} ({results['backend']})",
        "| config | output tok/s | vs the first 1-device row | peak GiB per rank |",
        "|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = f"{r['output_tok_s'] / base:.2f}x" if base else "-"
        lines.append(f"| {name} | {r['output_tok_s']:,.0f} | {ratio} | {r['peak_gib_per_rank']} |")
    for eq in results.get("equality", []):
        lines.append(
            f"TP equality {eq['dtype']}: teacher-forced max|dlogp| {eq['teacher_forced_max_abs_dlogp']:.3g} "
            f"(mean {eq['teacher_forced_mean_abs_dlogp']:.3g}, bitwise-equal {eq['teacher_forced_bitwise_equal_fraction']:.1%}); "
            f"greedy identical {eq['greedy_identical_sequences']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
