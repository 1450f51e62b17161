"""Split sweep for fast mode's decode attention (`triton_attention._decode`: split-KV, the last split of a
(sequence, KV head) to finish merges them).

`decode_num_splits` splits the context until ~2 programs per SM exist (4 before this sweep), from `max_seq_len`,
which a CUDA graph captures as max_model_len: at batch 1 and max_model_len 8192 every step runs 16 splits, so at
context 1024 each program reads one 64-key tile and the step is a chain of dependent round trips (8.1 us a layer on
the H200 for 4 MB of KV, 2026-12-01). This times the step at each forced split count per batch size and context
(CUDA-graph replays), beside the choice the engine's graphs make, and checks every output against a float64
reference (batch <= 32) or the unsplit launch (larger batches). Heads of Qwen3-0.6B (16 query, 8 KV) or Qwen3-8B
(32, 8), head_dim 128, 16-token pages, bf16.

  python -m benchmarks.decode_attention_sweep --out DIR                  # on the GPU (about a minute)
  python -m benchmarks.decode_attention_sweep --out DIR --spec qwen3-8b --contexts 1024 8192
  TRITON_INTERPRET=1 python -m benchmarks.decode_attention_sweep --out /tmp/das --smoke   # CPU: the script
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import triton

from benchmarks.invariant_attention_sweep import paged_decode_case
from parity.kernels.triton import attention as ta

HEADS = {"qwen3-0.6b": 16, "qwen3-8b": 32}
KV_HEADS, HEAD_DIM, PAGE = 8, 128, 16


def reference(q, k, v, scale: float) -> torch.Tensor:
    """float64 softmax(q k^T) v of one query per sequence over its whole context, GQA by repetition."""
    group = q.shape[1] // k.shape[2]
    k64 = k.double().repeat_interleave(group, dim=2)  # [B, T, H, D]
    v64 = v.double().repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,bthd->bht", q.double(), k64) * scale
    return torch.einsum("bht,bthd->bhd", scores.softmax(-1), v64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--spec", choices=sorted(HEADS), default="qwen3-0.6b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--max-model-len", type=int, default=8192, help="what the engine's graphs capture as max_seq_len")
    ap.add_argument("--smoke", action="store_true", help="batch 2, context 64, two split counts, no timing")
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.contexts, args.splits = [2], [64], [1, 2]
    if bad := [c for c in args.contexts if c < PAGE or c % PAGE]:
        ap.error(f"--contexts: each must be a positive multiple of {PAGE}, got {bad}")
    if bad := [s for s in args.splits if s < 1 or s & (s - 1)]:
        ap.error(f"--splits: each must be a power of two >= 1, got {bad}")
    if bad := [b for b in args.batches if b < 1]:
        ap.error(f"--batches: each must be >= 1, got {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    heads, dtype, scale = HEADS[args.spec], torch.bfloat16, HEAD_DIM**-0.5
    sms = ta._num_sms(torch.device(device))
    results = []
    for context in args.contexts:
        g = torch.Generator(device=device).manual_seed(context)
        n = max(args.batches)
        k_all = torch.randn(n, context, KV_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
        v_all = torch.randn(n, context, KV_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
        q_all = torch.randn(n, heads, HEAD_DIM, device=device, dtype=dtype, generator=g)
        for batch in args.batches:
            q, k_flat, v_flat, meta, _ = paged_decode_case(batch, context, k_all, v_all, q_all, PAGE)
            k_cache, v_cache = (t.view(-1, PAGE, KV_HEADS, HEAD_DIM) for t in (k_flat, v_flat))
            want = reference(q, k_all[:batch], v_all[:batch], scale) if batch <= 32 else None
            engine_choice = ta.decode_num_splits(batch, KV_HEADS, args.max_model_len, sms)
            row = {"context": context, "batch": batch, "engine_splits": engine_choice, "us": {}, "max_abs_err": {}}
            unsplit = None
            for splits in args.splits:
                out = torch.empty_like(q)
                step = partial(ta._decode, q, k_cache, v_cache, out, meta, scale, splits=splits)
                step()
                if unsplit is None:
                    unsplit = out.clone()
                err = (out.double() - (want if want is not None else unsplit.double())).abs().max().item()
                row["max_abs_err"][splits] = err
                row["us"][splits] = 0.0 if args.smoke else triton.testing.do_bench_cudagraph(step, rep=20) * 1e3
            best = min(row["us"], key=row["us"].get)
            results.append(row)
            print(f"ctx {context:5d} batch {batch:4d}: engine {engine_choice:2d} splits "
                  f"{row['us'].get(engine_choice, float('nan')):6.1f} us, best {best:2d} {row['us'][best]:6.1f} us | "
                  + "  ".join(f"{s}: {row['us'][s]:.1f}" for s in args.splits)
                  + f" | max err {max(row['max_abs_err'].values()):.2e} vs {'float64' if want is not None else 'unsplit'}")
    (args.out / "decode_attention_sweep.json").write_text(json.dumps(
        {"spec": args.spec, "heads": heads, "kv_heads": KV_HEADS, "max_model_len": args.max_model_len,
         "num_sms": sms, "results": results}, indent=1))


if __name__ == "__main__":
    main()
