"""benchmarks/kernel_resources.py: the occupancy arithmetic against CUDA's rules, and the tool itself, which compiles
the decode step's kernels for sm_90 ahead of time and reads them back through cuobjdump (no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from benchmarks import kernel_resources as kr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("registers, shared, warps, expected", [
    (121, 0, 4, 4),      # 128 threads x 128 registers (allocated per warp in units of 256): 4 x 16,384 = 65,536
    (129, 0, 4, 3),      # 136 per thread: 4,352 per warp, 17,408 per program -> 3
    (154, 0, 4, 3),      # 160 per thread -> 3
    (255, 0, 4, 2),      # 256 per thread -> 2
    (32, 0, 4, 16),      # warps: 64 per SM / 4
    (16, 0, 1, 32),      # programs: at most 32 per SM
    (40, 98304, 4, 2),   # shared memory: 228 KiB / (96 KiB + the 1 KiB reservation)
])
def test_programs_per_sm_follows_cudas_limits(registers, shared, warps, expected):
    assert kr.programs_per_sm(registers, shared, warps) == expected


@pytest.mark.skipif(not os.path.exists(kr._cuobjdump()), reason="Triton's wheel has no cuobjdump here")
def test_the_decode_kernels_compile_for_sm90_and_report_their_resources(tmp_path):
    """In a process of its own: the suite runs Triton's interpreter (TRITON_INTERPRET=1), whose kernels do not compile."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--out", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=600)
    rows = {r["name"]: r for r in json.loads((tmp_path / "kernel_resources.json").read_text())["rows"]}
    assert len(rows) == len(kr.variants())
    no_dot = ("fast GEMV", "log-softmax", "argmax")  # their loads feed no dot: plain loads into registers
    for row in rows.values():
        assert 16 <= row["registers"] <= 255 and row["programs_per_sm"] >= 1, row
        if row["name"].startswith(no_dot):
            # no spills; Triton 3.9's ptxas keeps an 8-byte frame in the preloaded one-row GLU GEMV (3.6's, none)
            assert row["stack_bytes"] <= 8, row
        else:
            assert row["shared_bytes"] > 0 and row["async_copies"] > 0, row  # every tensor-core loop is pipelined
    # deterministic mode's variants launched under dependent launch (PREFETCH: the few-row matmul, the split decode)
    # stream their weights / keys into L2 before the wait; fast mode's kernels do not prefetch
    assert sum(row["prefetch_asked"] for row in rows.values()) == 5
    for row in rows.values():
        assert row["l2_prefetch_before_wait"] == row["prefetch_asked"], row
    # fast mode's GEMV and split RoPE decode under dependent launch (PRELOAD) load their first weight chunks / key
    # tile into registers before the wait; without it the GEMV loads nothing there, the decode only its step inputs
    for row in rows.values():
        if row["name"].startswith("fast GEMV"):
            assert row["preload_asked"] and row["loads_before_wait"] > 0, row
    rope = "fast attention, decode with RoPE, q/k norm and the cache write, {} split(s)"
    assert rows[rope.format(16)]["preload_asked"] and not rows[rope.format(1)]["preload_asked"]
    assert rows[rope.format(16)]["loads_before_wait"] > rows[rope.format(1)]["loads_before_wait"]
    fused = rows["fast GEMV gate_up 6144x1024, 4 row(s), norm+has_residual+glu: 2x1024"]
    assert fused["stack_bytes"] == 0, fused  # the fused norm and SiLU parts spill nothing
    capped = rows["deterministic attention, decode, segment 256, maxnreg 128"]
    assert capped["registers"] <= 128
