"""Tile sweep for deterministic mode's batch-invariant matmul, beside cuBLAS (torch.matmul) in the same run.

A row's result may not depend on the batch it is in; the question this answers is whether it depends on the
tiles at all. For each weight shape of a model (Qwen3-0.6B by default) and each candidate configuration this
times M in --rows (CUDA-graph replays), checks that a row's result is the same bits alone and inside the big
batch (`inv`), and whether it is the same bits as `linear_config`'s choice at every M (`same`), and prints
each configuration's time relative to cuBLAS at the same M; a configuration the choice uses at some M is
marked `*`. If every configuration agrees, the tiles may follow the number of rows: narrow tiles and deep K
steps at decode batch sizes (where 64 x 128 tiles leave most SMs idle: N / 128 programs at M = 1), wide ones
for prefill and the trainer. On the H200 (2026-12-01, bf16) they all agreed; `linear_config` follows M since.

  python -m benchmarks.invariant_linear_sweep --out DIR       # on the GPU (about 2 minutes on an H100)
  python -m benchmarks.invariant_linear_sweep --out DIR --block-m 16 64 --block-n 32 64 128 --block-k 64 \
      --stages 4 --rows 1 8 64 2048                           # narrow tiles for decode: same bits?
  python -m benchmarks.invariant_linear_sweep --out DIR --block-m 16 64 --block-n 32 64 128 --block-k 64 128 256 \
      --stages 4 --rows 1 8 32 128 2048 --shapes qkv o gate_up down   # and deeper K steps?
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial
from pathlib import Path

import torch
import triton

from parity.kernels.triton import invariant as ti
from parity.kernels.triton.fast import mm_fp32_out

# (name, N, K) of Qwen3-0.6B: fused qkv, o_proj, fused gate_up, down, LM head (tied, float32 output).
QWEN3_06B_SHAPES = [("qkv", 4096, 1024), ("o", 1024, 2048), ("gate_up", 6144, 1024), ("down", 1024, 3072),
                    ("lm_head", 151936, 1024)]
QWEN3_8B_SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 24576, 4096), ("down", 4096, 12288),
                   ("lm_head", 151936, 4096)]
SHAPES = {"qwen3-0.6b": QWEN3_06B_SHAPES, "qwen3-8b": QWEN3_8B_SHAPES}


def candidates(block_m, block_n, block_k, stages_list, warps_list=None) -> list[dict]:
    """Every combination; without `warps_list`, 8 warps for tiles of 128 x 128 outputs or more, else 4."""
    out = []
    for bm, bn, bk, stages in itertools.product(block_m, block_n, block_k, stages_list):
        if bm == 128 and bn == 128 and bk == 128:
            continue  # shared memory
        for warps in warps_list or [8 if bm * bn >= 128 * 128 else 4]:
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
    return out


def bench(fn) -> float:
    """Microseconds per call, from CUDA-graph replays: the engine's decode runs in graphs, where launch
    overhead is gone and a small-M kernel's own latency is what is left."""
    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 128, 256, 2048, 8192])
    ap.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--block-k", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--warps", type=int, nargs="+", default=None,
                    help="warps per program (default: 8 for tiles of 128 x 128 outputs or more, else 4)")
    ap.add_argument("--shapes", nargs="+", choices=[name for name, _, _ in QWEN3_06B_SHAPES],
                    default=[name for name, _, _ in QWEN3_06B_SHAPES])
    ap.add_argument("--spec", choices=sorted(SHAPES), default="qwen3-0.6b", help="whose weight shapes")
    args = ap.parse_args()
    for name in ("block_m", "block_n", "block_k"):  # tl.arange and tl.dot need powers of two of at least 16
        bad = [b for b in getattr(args, name) if b < 16 or b & (b - 1)]
        if bad:
            ap.error(f"--{name.replace('_', '-')}: each must be a power of two >= 16, got {bad}")
    if bad := [s for s in args.stages if s < 1]:
        ap.error(f"--stages: each must be >= 1, got {bad}")
    if bad := [m for m in args.rows if m < 1]:
        ap.error(f"--rows: each must be >= 1, got {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    results = []
    for name, n, k in (shape for shape in SHAPES[args.spec] if shape[0] in args.shapes):
        fp32 = name == "lm_head"
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        xs = {m: torch.randn(m, k, device="cuda", dtype=dtype) for m in args.rows}
        peer = partial(mm_fp32_out, weight=w) if fp32 else partial(torch.nn.functional.linear, weight=w)  # fast mode's
        cublas = {m: bench(partial(peer, x)) for m, x in xs.items()}
        # fast mode's alternative at one row: cuBLAS's matrix-vector kernel instead of its GEMM's M = 1 choice
        gemv = bench(partial(torch.mv, w, xs[1][0])) if 1 in xs and not fp32 else None
        chosen = {m: ti.linear_config(n, k, m) for m in args.rows}
        chosen_out = {m: ti.linear(x, w, None, fp32, tiles=chosen[m]) for m, x in xs.items()}
        for cfg in candidates(args.block_m, args.block_n, args.block_k, args.stages, args.warps):
            try:
                times = {m: bench(partial(ti.linear, x, w, None, fp32, tiles=cfg)) for m, x in xs.items()}
                outs = {m: ti.linear(x, w, None, fp32, tiles=cfg) for m, x in xs.items()}
                big = outs[max(args.rows)]
                invariant = bool(torch.equal(ti.linear(xs[max(args.rows)][:1].clone(), w, None, fp32, tiles=cfg), big[:1]))
                same = all(torch.equal(outs[m], chosen_out[m]) for m in xs)
            except Exception as e:  # noqa: BLE001 -- out of shared memory etc.: report and go on
                print(name, cfg, "failed:", type(e).__name__, str(e)[:80])
                continue
            row = dict(shape=name, n=n, k=k, cfg=cfg, us=times, cublas_us=cublas, cublas_gemv_us=gemv, invariant=invariant,
                       same_bits_as_chosen=same, chosen_at=[m for m in args.rows if cfg == chosen[m]])
            results.append(row)
        rows = [r for r in results if r["shape"] == name]
        rows.sort(key=lambda r: sum(r["us"][m] / cublas[m] for m in args.rows))
        print(f"== {name} N={n} K={k}  cuBLAS us: " + " ".join(f"M{m}={cublas[m]:.1f}" for m in args.rows)
              + (f"  (torch.mv at M1: {gemv:.1f})" if gemv is not None else ""))
        for r in rows[:12] + [r for r in rows[12:] if r["chosen_at"]]:
            c = r["cfg"]
            tag = "*" if r["chosen_at"] else " "
            print(f" {tag} bm{c['BLOCK_M']} bn{c['BLOCK_N']} bk{c['BLOCK_K']} st{c['num_stages']} "
                  f"w{c['num_warps']} inv={int(r['invariant'])} same={int(r['same_bits_as_chosen'])} x cuBLAS: "
                  + " ".join(f"M{m}={r['us'][m] / cublas[m]:.2f}" for m in args.rows))
    (args.out / "invariant_linear_sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
