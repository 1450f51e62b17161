"""Launch sweep for fast mode's few-row matmul kernels: the matrix-vector kernel (`triton/gemv.py`) per BLOCK_N x
BLOCK_K x warps x stages, beside cuBLAS (`F.linear`) and the deterministic kernel's narrow tile, at 1, 2 and 4 rows
of each projection of Qwen3-0.6B (or `--spec qwen3-8b`), and the kernel the engine picks (`fast.few_row_kernel`,
which times the three on first sight of a shape). Times from CUDA-graph replays; every output is checked against
float64. Prints each shape's cuBLAS time, the narrow tile's, the GEMV's default configuration and its best one.
Each timed call reads a different copy of the weight, cycling through `fast.cold_copies` (more bytes than the L2
holds), as a decode step reads every layer's weights from HBM; `--hot` times one weight, L2-resident after the
first call.

  python -m benchmarks.gemv_sweep --out DIR                     # on the GPU (about a minute)
  python -m benchmarks.gemv_sweep --out DIR --spec qwen3-8b
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.invariant_linear_sweep import SHAPES, bench
from parity.kernels.triton import fast, gemv
from parity.kernels.triton import invariant as ti


def _us(v: float | None) -> str:
    return "wrong" if v is None else f"{v:.1f}"


def sweep_case(name: str, w: torch.Tensor, m: int, args) -> dict:
    """One projection at m rows: cuBLAS, the narrow tile, the GEMV at its default and at every swept launch."""
    n, k = w.shape
    x = torch.randn(m, k, device=w.device).bfloat16()
    ref = x.double() @ w.double().T
    weights = [w] if args.hot else fast.cold_copies(w)

    def timed(fn) -> float | None:
        err = ((fn(x, w).double() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            return None  # a wrong result, never a time
        return bench(lambda: [fn(x, wc) for wc in weights]) / len(weights)

    row = {"shape": name, "n": n, "k": k, "rows": m, "hot": args.hot, "cublas_us": timed(F.linear),
           "narrow_tile_us": timed(ti.linear), "gemv_default": gemv.gemv_config(n, k, m),
           "gemv_default_us": timed(gemv.gemv), "engine_pick": fast.few_row_kernel(m, w, None),
           "gemv": []}
    for bn, bk, warps, stages in itertools.product(args.block_n, args.block_k, args.warps, args.stages):
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        try:
            row["gemv"].append({**cfg, "us": timed(lambda x, w, cfg=cfg: gemv.gemv(x, w, None, cfg))})
        except Exception as e:  # noqa: BLE001 -- out of resources: report and go on
            print(f"  {cfg} failed: {type(e).__name__}")
    valid = [g for g in row["gemv"] if g["us"] is not None]
    row["gemv_best"] = min(valid, key=lambda g: g["us"]) if valid else None
    best = row["gemv_best"]
    print(f"== {name} N={n} K={k} rows={m}: cuBLAS {_us(row['cublas_us'])} us, narrow tile "
          f"{_us(row['narrow_tile_us'])}, GEMV default {_us(row['gemv_default_us'])}, best "
          f"{_us(best and best['us'])} ({best}); engine picks {row['engine_pick']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--spec", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--block-n", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--block-k", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--warps", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--hot", action="store_true", help="time one weight (L2-resident) instead of cycling copies")
    args = ap.parse_args()
    if bad := [r for r in args.rows if not 1 <= r <= gemv.MAX_ROWS]:
        ap.error(f"--rows: each must be in [1, {gemv.MAX_ROWS}], got {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = []
    for name, n, k in SHAPES[args.spec]:
        if name == "lm_head":
            continue  # float32 logits: linear_fp32, not these kernels
        w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
        for m in args.rows:
            results.append(sweep_case(name, w, m, args))
            (args.out / "gemv_sweep.json").write_text(json.dumps(dict(spec=args.spec, results=results), indent=1))


if __name__ == "__main__":
    main()
