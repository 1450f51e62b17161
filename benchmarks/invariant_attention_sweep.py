"""Launch sweep for deterministic mode's attention (`triton_attention.prefill` with `attention_tile`'s rows).

Its key tiles (BLOCK_N = 64, from position 0) and key segments (`--segment` positions each, its own online softmax,
merged in order; 0: one softmax over all keys, deterministic mode's path before KEY_SEGMENT became 256) fix a row's numbers;
warps per program and software-pipelining depth only decide how fast they come, unless a layout change moves a
reduction. For each (num_warps, num_stages, register cap) this times a decode step over the paged cache (batch 1,
32 and 256, context 1024: at batch 1 eight programs walk 16 key tiles each, the chain the batch-1 profile names;
with segments also split, a program per segment, at 256 too, and as the engine's graphs launch it, with a program for
every segment up to max_model_len; at 256 the cache's bandwidth decides, and with it how many
programs an SM holds: `benchmarks.kernel_resources`) and the trainer's packed prefill (2 x 1024 tokens), and checks that
every output is the same bits as the reference launch's (4 warps, 2 stages: prefill's; a split step owes the
unsplit one's bits) and that a decode row equals the packed batch's row at the same position. Qwen3-0.6B heads
(16 query, 8 KV, head_dim 128), bf16; times from CUDA-graph replays (`triton.testing.do_bench_cudagraph`).

  python -m benchmarks.invariant_attention_sweep --out DIR                 # on the GPU (about a minute)
  python -m benchmarks.invariant_attention_sweep --out DIR --segment 0     # the unsegmented path, as on 2026-12-01
  python -m benchmarks.invariant_attention_sweep --out DIR --warps 4 --stages 2 3 --maxnreg 0 128   # register caps
  python -m benchmarks.invariant_attention_sweep --out DIR --tokens 8 32 --warps 1 4 --stages 2   # taller tiles: same bits?
  TRITON_INTERPRET=1 python -m benchmarks.invariant_attention_sweep --out /tmp/ias --smoke --segment 64   # CPU: the script
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import triton

from parity.kernels.metadata import AttentionMetadata
from parity.kernels.triton import invariant as ti
from parity.kernels.triton.attention import prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter, for --smoke
HEADS, KV_HEADS, HEAD_DIM, PAGE = 16, 8, 128, 16


def paged_decode_case(batch: int, context: int, k_all, v_all, q_last, page: int = PAGE):
    """Sequences of `context` tokens in shuffled cache blocks of `page` tokens, one query each (the last position);
    K/V [sequences, tokens, KV heads, head_dim]. The cache comes back flat: [blocks * page, KV heads, head_dim]."""
    blocks_per_seq = context // page
    kv_heads, head_dim = k_all.shape[-2:]
    device = k_all.device
    perm = torch.randperm(batch * blocks_per_seq, generator=torch.Generator().manual_seed(1)).to(device)
    tables = perm.view(batch, blocks_per_seq).to(torch.int32)
    k_cache = torch.empty(batch * blocks_per_seq, page, kv_heads, head_dim, dtype=k_all.dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    k_cache[tables.long().flatten()] = k_all[:batch, :context].reshape(-1, page, kv_heads, head_dim)
    v_cache[tables.long().flatten()] = v_all[:batch, :context].reshape(-1, page, kv_heads, head_dim)
    starts = list(range(batch + 1))
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device), max_query_len=1,
        max_seq_len=context, query_start_loc_cpu=starts, seq_lens_cpu=[context] * batch, block_tables=tables)
    q = q_last[:batch].contiguous()
    return q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), meta, tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--maxnreg", type=int, nargs="+", default=[0],
                    help="register caps per thread to try (0: none, ptxas's choice)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="query tokens per program to try (default: attention_tile's); rows = tokens x the padded group")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--graph-len", type=int, default=8192, help="max_model_len of the '256 graph' split case")
    ap.add_argument("--segment", type=int, default=256,
                    help="keys per softmax segment (default: KEY_SEGMENT's 256); 0: one online softmax over all keys")
    ap.add_argument("--smoke", action="store_true", help="context 128, one launch, no timing: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.context, args.warps, args.stages = 128, [4], [2]
    if bad := [w for w in args.warps if w not in (1, 2, 4, 8, 16)]:
        ap.error(f"--warps: each must be 1, 2, 4, 8 or 16, got {bad}")
    if bad := [s for s in args.stages if s < 1]:
        ap.error(f"--stages: each must be >= 1, got {bad}")
    if bad := [r for r in args.maxnreg if r and not 24 <= r <= 255]:
        ap.error(f"--maxnreg: each must be 0 or in [24, 255], got {bad}")
    if bad := [t for t in args.tokens or [] if t < 1 or t & (t - 1)]:
        ap.error(f"--tokens: each must be a power of two, got {bad}")
    if args.segment < 0 or args.segment % 64:
        ap.error(f"--segment: 0 or a positive multiple of 64, got {args.segment}")
    if args.context < PAGE or args.context % PAGE:
        ap.error(f"--context: a positive multiple of {PAGE}, got {args.context}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ctx, dtype, scale = args.context, torch.bfloat16, HEAD_DIM**-0.5
    k_all = torch.randn(32, ctx, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    v_all = torch.randn_like(k_all)
    q_all = torch.randn(32, ctx, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    batches = (1, 32) if args.smoke else (1, 32, 256)  # 256: the 32 sequences' keys 8 times over
    k_many, v_many, q_many = (t.repeat(8, 1, 1, 1) for t in (k_all, v_all, q_all[:, -1:]))
    decode = {b: paged_decode_case(b, ctx, k_many, v_many, q_many[:, -1]) for b in batches}
    packed_meta = AttentionMetadata.for_packed_sequences([ctx, ctx], DEVICE)
    packed = (q_all[:2].flatten(0, 1), k_all[:2].flatten(0, 1), v_all[:2].flatten(0, 1))
    tile = {**ti.attention_tile(HEADS, KV_HEADS), "segment": args.segment}
    # decode at batch 1, 32 (and 256), each in one program per row and with its segments split, and the packed prefill
    # "graph": split as in the engine's CUDA graphs, whose metadata says max_model_len (--graph-len) and so launch a
    # program for every segment up to it; those past a row's context return at once.
    splits = ["1 split", "32 split", "256 split", "256 graph"] if not args.smoke else ["1 split", "32 split"]
    cases = [str(b) for b in batches] + ["packed"] + (splits if args.segment and ctx > args.segment else [])

    def run(case: str, launch: dict) -> tuple:
        if case == "packed":
            q, k, v = packed
            out = torch.zeros_like(q)
            return out, partial(prefill, q, k, v, out, packed_meta, scale, None, 1, **launch)
        batch, _, split = case.partition(" ")
        q, k, v, meta, tables = decode[int(batch)]
        if split == "graph":
            meta = replace(meta, max_seq_len=args.graph_len)
        out = torch.zeros_like(q)
        return out, partial(prefill, q, k, v, out, meta, scale, tables, PAGE, **launch, split=bool(split))

    default = {**tile, "num_warps": 4, "num_stages": 2}  # the reference launch
    reference = {}
    for case in [str(b) for b in batches] + ["packed"]:
        out, fn = run(case, default)
        fn()
        reference[case] = out.clone()
    for case in cases[len(batches) + 1:]:
        reference[case] = reference[case.split()[0]]  # a split step owes the unsplit one's bits
    # The engine's property, under the default launch: a decode row = the packed batch's row at that position.
    packed_last = reference["packed"].view(2, ctx, HEADS, HEAD_DIM)[:, -1]
    print("default launch: decode row == packed row:", bool(torch.equal(reference["32"][:2], packed_last)))
    results = []
    for tokens, warps, stages, maxnreg in itertools.product(args.tokens or [tile["tokens"]], args.warps, args.stages,
                                                             args.maxnreg):
        launch = {**tile, "tokens": tokens, "num_warps": warps, "num_stages": stages, "maxnreg": maxnreg or None}
        row = dict(tokens=tokens, num_warps=warps, num_stages=stages, maxnreg=maxnreg,
                   default=launch == {**default, "maxnreg": None}, us={}, same_bits_as_default={})
        try:
            for case in cases:
                out, fn = run(case, launch)
                fn()
                row["same_bits_as_default"][case] = bool(torch.equal(out, reference[case]))
                row["us"][case] = 0.0 if args.smoke else triton.testing.do_bench_cudagraph(fn, rep=20) * 1e3
        except Exception as e:  # noqa: BLE001 -- out of shared memory or registers: report and go on
            print(f"t{tokens} w{warps} st{stages} r{maxnreg} failed: {type(e).__name__} {str(e)[:80]}")
            continue
        results.append(row)
        tag = "*" if row["default"] else " "
        print(f" {tag} t{tokens} w{warps} st{stages} r{maxnreg} same={int(all(row['same_bits_as_default'].values()))} us: "
              + "  ".join(f"{'decode b' + c if c != 'packed' else f'packed 2x{ctx}'} {row['us'][c]:.1f}" for c in cases))
    (args.out / "invariant_attention_sweep.json").write_text(json.dumps(dict(context=ctx, tile=tile, results=results), indent=1))


if __name__ == "__main__":
    main()
