"""What programmatic dependent launch (PDL) would save between the small kernels of a batch-1 decode step.

A batch-1 step of Qwen3-0.6B's shapes is ~309 kernels of 2-8 us in one CUDA graph (benchmarks/RESULTS.md), each
waiting for the previous one to finish and drain before its own programs start. With PDL (Hopper and later;
Triton's `launch_pdl` launch option with `gdc_wait` / `gdc_launch_dependents` in the kernel) the next kernel is
launched while the previous one runs and waits in `gdc_wait` only for its results, so launch and prologue overlap.
This times a chain of dependent RMSNorm-sized kernels (one row of `--hidden` bf16 values, each kernel reading the
previous one's output) replayed from a CUDA graph, with and without PDL, and checks both chains give the expected
result. If the saving per kernel boundary is large, the engine's small-batch kernels are worth the change.

  python -m benchmarks.pdl_chain --out DIR                # on the GPU (seconds)
  TRITON_INTERPRET=1 python -m benchmarks.pdl_chain --out /tmp/pdl --smoke   # CPU: the script, without PDL
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from benchmarks.invariant_linear_sweep import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()  # the previous kernel's writes are visible after this
        gdc_launch_dependents()  # the next kernel may launch now; it waits in its own gdc_wait
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (x * 0.5 + 1.0).to(y_ptr.dtype.element_ty), mask=offs < n)


def chain(a: torch.Tensor, b: torch.Tensor, length: int, programs: int, pdl: bool) -> None:
    """`length` dependent launches ping-ponging between a and b."""
    block = triton.next_power_of_2(triton.cdiv(a.numel(), programs))
    for i in range(length):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        _scale_kernel[(triton.cdiv(a.numel(), block),)](src, dst, a.numel(), BLOCK=block, PDL=pdl, num_warps=4,
                                                        **({"launch_pdl": True} if pdl else {}))


def expected(x0: torch.Tensor, length: int) -> torch.Tensor:
    x = x0.float()
    for _ in range(length):
        x = (x * 0.5 + 1.0).to(x0.dtype).float()
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--length", type=int, default=300, help="kernels in the chain (a batch-1 step has ~309)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--programs", type=int, nargs="+", default=[1, 8, 64], help="programs per kernel")
    ap.add_argument("--smoke", action="store_true", help="a short chain, no PDL, no timing: checks the script")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.length, args.programs = 4, [1]
    rows = []
    for programs in args.programs:
        for pdl in [False] if args.smoke else [False, True]:
            x0 = torch.randn(args.hidden, device=DEVICE).bfloat16()
            a, b = x0.clone(), torch.empty_like(x0)
            chain(a, b, args.length, programs, pdl)
            result = a if args.length % 2 == 0 else b
            # bf16 rounding: the interpreter truncates where the GPU rounds to nearest
            correct = bool(torch.allclose(result.float(), expected(x0, args.length), rtol=1e-2, atol=1e-2))
            row = {"programs": programs, "pdl": pdl, "correct": correct}
            if not args.smoke:  # the chain as one CUDA graph, replayed (us per chain)
                row["us_per_kernel"] = bench(partial(chain, a, b, args.length, programs, pdl)) / args.length
            rows.append(row)
            print(f"programs {programs:3d} pdl {int(pdl)}: correct {int(correct)}"
                  + (f", {row['us_per_kernel']:.2f} us per kernel in a graph" if "us_per_kernel" in row else ""))
    (args.out / "pdl_chain.json").write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()},
                                                             rows=rows), indent=1))


if __name__ == "__main__":
    main()
