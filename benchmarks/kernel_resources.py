"""Registers, spills, shared memory and programs per SM of the decode step's Triton kernels on Hopper (sm_90),
compiled ahead of time on the CPU: no GPU and no device time needed.

A memory-bound kernel's speed follows how many of its programs an SM holds at once, and that follows the registers
per thread (65,536 per SM) and the shared memory per program. On the H200 (2026-12-01) deterministic attention
with key segments ran a batch-256 decode step 12-15% slower than without, with one segment or five alike: a cost
of the code shape, not of the segments' work. This is how to see such causes before spending device time.

Each variant is compiled with `triton.compile` for sm_90 with the arguments the launchers pass (constexprs, warps,
stages; pointers and strides as the JIT specialises them, multiples of 16) and read back with the cuobjdump of
Triton's wheel. The figures are those of the Triton installed here; the GPU machine's may differ by version
(`PYTHONPATH=<dir with triton==3.6.0> python -m benchmarks.kernel_resources` gives the H200 image's).
Qwen3-0.6B's shapes (16 query heads, 8 KV heads, head_dim 128, 16-token pages), bf16.

  python -m benchmarks.kernel_resources              # the table
  python -m benchmarks.kernel_resources --out DIR    # and DIR/kernel_resources.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from parity.kernels.triton import attention, gemv, invariant, pdl

TARGET = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024  # per SM on Hopper, of which a program may use up to 227 KiB
SHARED_RESERVED_PER_PROGRAM = 1024  # the driver's per-block reservation
MAX_WARPS_PER_SM = 64
MAX_PROGRAMS_PER_SM = 32
INTEGER_POINTERS = {"query_start_loc_ptr", "seq_lens_ptr", "block_tables_ptr", "counter_ptr"}
FLOAT32_POINTERS = {"part_ptr", "part_out_ptr", "part_lse_ptr"}


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: triton.runtime.JITFunction
    constexprs: dict
    num_warps: int
    num_stages: int
    floats: tuple[str, ...] = ("qk_scale", "eps")
    ints: dict = field(default_factory=dict)  # integer arguments known at launch (N, K of a GEMM), for divisibility
    maxnreg: int | None = None  # a cap on registers per thread (ptxas spills the rest)
    pointers: dict = field(default_factory=dict)  # pointer types other than the defaults below (name -> "*fp32")


def _signature(v: Variant) -> tuple[dict, dict]:
    """(signature, attributes): every pointer and every integer argument the JIT would see as a multiple of 16
    (strides, and `ints` that are) marked so, except the arguments the kernel asks not to specialise on."""
    skip = {v.kernel.arg_names[a] if isinstance(a, int) else a for a in v.kernel.do_not_specialize}
    sig, attrs = {}, {}
    for i, name in enumerate(v.kernel.arg_names):
        if name in v.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            default = "*i32" if name in INTEGER_POINTERS else "*fp32" if name in FLOAT32_POINTERS else "*bf16"
            sig[name] = v.pointers.get(name, default)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in v.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            known = v.ints.get(name)
            if name not in skip and (name.startswith("stride_") or (known is not None and known % 16 == 0)):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def programs_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """How many programs of this kernel one SM holds at once: registers are given out per warp in units of 256
    (8 per thread), shared memory per program with the driver's reservation, at most 64 warps and 32 programs."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (per_warp * num_warps)
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_PROGRAM)
    return min(by_registers, by_shared, MAX_WARPS_PER_SM // num_warps, MAX_PROGRAMS_PER_SM)


def resources(v: Variant) -> dict:
    """Compile `v` for sm_90 and read its resource usage (cuobjdump) and its pipelined loads (TTGIR)."""
    sig, attrs = _signature(v)
    compiled = triton.compile(ASTSource(fn=v.kernel, signature=sig, constexprs=v.constexprs, attrs=attrs),
                              target=TARGET, options=dict(num_warps=v.num_warps, num_stages=v.num_stages,
                                           **({"maxnreg": v.maxnreg} if v.maxnreg else {})))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", dump))
    registers, stack = int(usage["REG"]), int(usage["STACK"]) + int(usage["LOCAL"])  # spills live in the stack frame
    shared = compiled.metadata.shared  # dynamic shared memory the launcher asks for
    ptx = compiled.asm["ptx"]
    prefetch, wait = ptx.find("prefetch.global.L2"), ptx.find("griddepcontrol.wait")
    return {"name": v.name, "num_warps": v.num_warps, "num_stages": v.num_stages, "registers": registers,
            "stack_bytes": stack, "shared_bytes": shared,
            "async_copies": compiled.asm["ttgir"].count("async_copy_global_to_local"),
            "programs_per_sm": programs_per_sm(registers, shared, v.num_warps),
            "prefetch_asked": bool(v.constexprs.get("PREFETCH")),
            "l2_prefetch_before_wait": prefetch >= 0 and (wait < 0 or prefetch < wait),
            "preload_asked": bool(v.constexprs.get("PRELOAD")),
            "loads_before_wait": ptx[:wait].count("ld.global") if wait >= 0 else 0}


def variants() -> list[Variant]:
    """The decode step's attention (deterministic with and without key segments, split or not; fast mode's split-KV
    kernel) and deterministic mode's matmul at the tiles `linear_config` gives 1, 256 and 2048 rows."""
    heads, kv_heads, head_dim, page = 16, 8, 128, 16
    tile = invariant.attention_tile(heads, kv_heads)
    det = dict(GROUP=heads // kv_heads, NUM_HEADS=heads, HEAD_DIM=head_dim, PAGE_SIZE=page, PAGED=True,
               TOKENS=tile["tokens"], HEADS=tile["heads"], SKIP_SINGLE=False, BLOCK_N=64, BLOCK_D=head_dim)
    segment = invariant.KEY_SEGMENT or 256
    out = [Variant(f"deterministic attention, decode, segment {seg}{', split' if split else ''}"
                   f"{f', maxnreg {cap}' if cap else ''}", attention._prefill_kernel,
                   dict(det, SEGMENT=seg, SPLIT=split, PREFETCH=split),
                   4, 3, maxnreg=cap)
           for seg, split, cap in ((0, False, None), (segment, False, None), (segment, True, None), (segment, False, 128),
                                   (segment, True, 128))]
    out += [Variant(f"fast attention, prefill (64 tokens x 1 head){', decode rows skipped' if skip else ''}",
                    attention._prefill_kernel,
                    dict(det, TOKENS=64, HEADS=1, SEGMENT=0, SPLIT=False, SKIP_SINGLE=skip, PREFETCH=False),
                    4, 2) for skip in (False, True)]
    fast_decode = dict(NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, GROUP=heads // kv_heads, HEAD_DIM=head_dim,
                       PAGE_SIZE=page, BLOCK_H=16, BLOCK_N=64, BLOCK_D=head_dim, ROPE=False, NORM=False,
                       PRELOAD=False)
    out += [Variant(f"fast attention, decode, {splits} split(s)", attention._decode_kernel,
                    dict(fast_decode, NUM_SPLITS=splits, MIXED=False), 4, 2) for splits in (1, 16)]
    out += [Variant(f"fast attention, decode with RoPE, q/k norm and the cache write, {splits} split(s)",
                    attention._decode_kernel, dict(fast_decode, NUM_SPLITS=splits, MIXED=False, ROPE=True, NORM=True,
                                                   PRELOAD=splits > 1),
                    4, 2, pointers={"slot_ptr": "*i64"}) for splits in (1, 16)]
    out.append(Variant("fast attention, decode rows of a mixed step, 1 split", attention._decode_kernel,
                       dict(fast_decode, NUM_SPLITS=1, MIXED=True), 4, 2))
    for n, k, m, glu in ((4096, 1024, 1, False), (4096, 1024, 256, False), (4096, 1024, 2048, False),
                         (4096, 12288, 1, False), (6144, 1024, 1, True), (6144, 1024, 256, True),
                         (6144, 1024, 2048, True)):
        cfg = invariant.linear_config(n, k, m)
        cfg = invariant.glu_config(cfg) if glu else cfg
        tiles = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        out.append(Variant(f"deterministic matmul {n}x{k}{' + SiLU-and-mul' if glu else ''}, {m} row(s): "
                           f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']}", invariant._linear_kernel,
                           dict(tiles, HAS_BIAS=False, GLU=glu, PREFETCH=m <= invariant.PREFETCH_ROWS),
                           cfg["num_warps"], cfg["num_stages"],
                           ints=dict(N=n // 2 if glu else n, K=k)))
    for name, n, k, rows, parts in (("qkv", 4096, 1024, 1, {}), ("qkv", 4096, 1024, 1, dict(NORM=True, HAS_RESIDUAL=True)),
                                    ("o", 1024, 2048, 4, {}), ("gate_up", 6144, 1024, 1, dict(GLU=True)),
                                    ("gate_up", 6144, 1024, 4, dict(NORM=True, HAS_RESIDUAL=True, GLU=True))):
        cfg = gemv._device_config(n, k, rows)
        block_n = cfg["BLOCK_N"] // 2 if parts.get("GLU") else cfg["BLOCK_N"]  # as gemv._launch halves it
        flags = {"HAS_BIAS": False, "NORM": False, "HAS_RESIDUAL": False, "GLU": False} | parts
        label = "+".join(key.lower() for key, on in parts.items() if on) or "plain"
        out.append(Variant(f"fast GEMV {name} {n}x{k}, {rows} row(s), {label}: {block_n}x{cfg['BLOCK_K']}", gemv._gemv_kernel,
                           dict(flags, ROWS=rows, BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"],
                                PRELOAD=min(2, -(-k // cfg["BLOCK_K"]))), cfg["num_warps"],
                           cfg["num_stages"], ints=dict(N=n // 2 if parts.get("GLU") else n, K=k)))
    chunks = -(-151936 // invariant.LOG_SOFTMAX_CHUNK)
    chunked = dict(CHUNK=invariant.LOG_SOFTMAX_CHUNK, BLOCK=invariant.LOG_SOFTMAX_BLOCK)
    logits = {"x_ptr": "*fp32", "out_ptr": "*fp32", "arg_ptr": "*i32", "token_ptr": "*i64", "logprob_ptr": "*fp32"}
    out += [Variant(f"log-softmax chunk (max, sum){' + argmax' if argmax else ''}", invariant._chunk_max_sum_kernel,
                    dict(chunked, ARGMAX=argmax), 4, 3, pointers=logits) for argmax in (False, True)]
    out.append(Variant("log-softmax chunk write", invariant._chunk_log_softmax_kernel,
                       dict(chunked, NUM_CHUNKS=chunks, CHUNKS_P2=triton.next_power_of_2(chunks)), 4, 3, pointers=logits))
    out.append(Variant("argmax + its log-softmax, merge", invariant._argmax_logprob_kernel,
                       dict(NUM_CHUNKS=chunks, CHUNKS_P2=triton.next_power_of_2(chunks)), 1, 3, pointers=logits))
    return out


def table(rows: list[dict]) -> str:
    lines = ["| kernel | warps | stages | registers | stack, spills (B) | shared (B) | pipelined loads | programs/SM "
             "| L2 prefetch before the wait | global loads before the wait |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | {r['stack_bytes']} | "
              f"{r['shared_bytes']} | {r['async_copies']} | {r['programs_per_sm']} | "
              f"{'yes' if r['l2_prefetch_before_wait'] else 'no'} | {r['loads_before_wait']} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="also write kernel_resources.json here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 turns the kernels into interpreted functions, which do not compile: unset it")
    # As on the H200: the dependent-launch wait and the prefetches compile in (a CPU build has them off)
    pdl.ENABLED, pdl.PREFETCH_ENABLED = triton.language.constexpr(True), triton.language.constexpr(True)
    rows = [resources(v) for v in variants()]
    print(f"Triton {triton.__version__}, sm_90")
    print(table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_resources.json").write_text(json.dumps({"triton": triton.__version__, "rows": rows},
                                                                   indent=1))


if __name__ == "__main__":
    main()
