"""Launch sweep for fast mode's few-row matmul kernels: the matrix-vector kernel (`triton/gemv.py`) per BLOCK_N x
BLOCK_K x warps x stages, beside cuBLAS (`F.linear`) and the deterministic kernel's narrow tile, at 1, 2 and 4 rows
of each projection of Qwen3-0.6B (or `--spec qwen3-8b`), and the kernel the engine picks (`fast.few_row_kernel`,
which times the three on first sight of a shape). Times from CUDA-graph replays; every output is checked against
float64. Prints each shape's cuBLAS time, the narrow tile's, the GEMV's default configuration and its best one.
Each timed call reads a different copy of the weight, cycling through `fast.cold_copies` (more bytes than the L2
holds), as a decode step reads every layer's weights from HBM; `--hot` times one weight, L2-resident after the
first call.

`--fused` times the fused variants instead, beside the unfused pairs they would replace, each at the default launch:
RMSNorm (with the residual add) + GEMV of the qkv and gate_up inputs against `gemv.rms_norm_gemv`, and the gate_up
GEMV + SiLU-and-mul against `gemv.gemv_silu_and_mul`; once plainly and once with programmatic dependent launch, as the
engine's small-batch decode graphs run (`triton/pdl.py`: PDL shortens the boundary that fusing removes).

  python -m benchmarks.gemv_sweep --out DIR                     # on the GPU (about a minute)
  python -m benchmarks.gemv_sweep --out DIR --spec qwen3-8b
  python -m benchmarks.gemv_sweep --out DIR --fused
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.invariant_linear_sweep import SHAPES, bench
from parity.kernels import reference
from parity.kernels.dispatch import dependent_launches
from parity.kernels.triton import elementwise, fast, gemv, norm
from parity.kernels.triton import invariant as ti

EPS = 1e-6  # Qwen3's rms_norm_eps


def _us(v: float | None) -> str:
    return "wrong" if v is None else f"{v:.1f}"


def timed(fn, w: torch.Tensor, ref: torch.Tensor, weights: list[torch.Tensor]) -> float | None:
    """Microseconds per call of fn(weight), cycling through `weights`; None where fn(w) is off float64 `ref` by 1e-2
    or more (a wrong result, never a time)."""
    err = ((fn(w).double() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        return None
    return bench(lambda: [fn(wc) for wc in weights]) / len(weights)


def sweep_case(name: str, w: torch.Tensor, m: int, args) -> dict:
    """One projection at m rows: cuBLAS, the narrow tile, the GEMV at its default and at every swept launch."""
    n, k = w.shape
    x = torch.randn(m, k, device=w.device).bfloat16()
    ref = x.double() @ w.double().T
    weights = [w] if args.hot else fast.cold_copies(w)
    timed_x = lambda fn: timed(lambda wc: fn(x, wc), w, ref, weights)

    row = {"shape": name, "n": n, "k": k, "rows": m, "hot": args.hot, "cublas_us": timed_x(F.linear),
           "narrow_tile_us": timed_x(ti.linear), "gemv_default": gemv.gemv_config(n, k, m),
           "gemv_default_us": timed_x(gemv.gemv), "engine_pick": fast.few_row_kernel(m, w, None),
           "gemv": []}
    for bn, bk, warps, stages in itertools.product(args.block_n, args.block_k, args.warps, args.stages):
        cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        try:
            row["gemv"].append({**cfg, "us": timed_x(lambda x, w, cfg=cfg: gemv.gemv(x, w, None, cfg))})
        except Exception as e:  # noqa: BLE001 -- out of resources: report and go on
            print(f"  {cfg} failed: {type(e).__name__}")
    valid = [g for g in row["gemv"] if g["us"] is not None]
    row["gemv_best"] = min(valid, key=lambda g: g["us"]) if valid else None
    best = row["gemv_best"]
    print(f"== {name} N={n} K={k} rows={m}: cuBLAS {_us(row['cublas_us'])} us, narrow tile "
          f"{_us(row['narrow_tile_us'])}, GEMV default {_us(row['gemv_default_us'])}, best "
          f"{_us(best and best['us'])} ({best}); engine picks {row['engine_pick']}")
    return row


def fused_case(name: str, w: torch.Tensor, m: int, args) -> dict:
    """One fusion at m rows against [n, k] weight w: the unfused pair and the fused kernel, each without and with
    PDL. The activations (x, residual, norm weight) are one set, L2-resident as a just-written hidden state is."""
    k = w.shape[1]
    x, res = (torch.randn(m, k, device=w.device).bfloat16() for _ in range(2))
    norm_w = (1 + 0.1 * torch.randn(k, device=w.device)).bfloat16()
    if name == "gate_up + silu_and_mul":
        unfused = lambda wc: elementwise.silu_and_mul(gemv.gemv(x, wc))
        fused = lambda wc: gemv.gemv_silu_and_mul(x, wc)
        ref = reference.silu_and_mul(x.double() @ w.double().T)
    else:
        unfused = lambda wc: gemv.gemv(norm.rms_norm(x, norm_w, EPS, res)[0], wc)
        fused = lambda wc: gemv.rms_norm_gemv(x, norm_w, EPS, wc, residual=res)[0]
        ref = reference.rms_norm(x.double(), norm_w.double(), EPS, res.double())[0] @ w.double().T
    weights = [w] if args.hot else fast.cold_copies(w)
    row = {"case": name, "n": w.shape[0], "k": k, "rows": m, "hot": args.hot}
    for pdl in (False, True):
        with dependent_launches(pdl):
            for kind, fn in (("unfused", unfused), ("fused", fused)):
                row[f"{kind}{'_pdl' if pdl else ''}_us"] = timed(fn, w, ref, weights)
    print(f"== {name} N={w.shape[0]} K={k} rows={m}: unfused {_us(row['unfused_us'])} us, fused "
          f"{_us(row['fused_us'])}; with PDL unfused {_us(row['unfused_pdl_us'])}, fused {_us(row['fused_pdl_us'])}")
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
    ap.add_argument("--fused", action="store_true", help="time the fused variants against the unfused pairs instead")
    args = ap.parse_args()
    if bad := [r for r in args.rows if not 1 <= r <= gemv.MAX_ROWS]:
        ap.error(f"--rows: each must be in [1, {gemv.MAX_ROWS}], got {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    results = []
    if args.fused:
        shapes = {name: (n, k) for name, n, k in SHAPES[args.spec]}
        cases = [("rms_norm + qkv", "qkv"), ("rms_norm + gate_up", "gate_up"), ("gate_up + silu_and_mul", "gate_up")]
        for name, shape in cases:
            n, k = shapes[shape]
            w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
            for m in args.rows:
                results.append(fused_case(name, w, m, args))
                (args.out / "gemv_fused.json").write_text(json.dumps(dict(spec=args.spec, results=results), indent=1))
        return
    for name, n, k in SHAPES[args.spec]:
        if name == "lm_head":
            continue  # float32 logits: linear_fp32, not these kernels
        w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
        for m in args.rows:
            results.append(sweep_case(name, w, m, args))
            (args.out / "gemv_sweep.json").write_text(json.dumps(dict(spec=args.spec, results=results), indent=1))


if __name__ == "__main__":
    main()
