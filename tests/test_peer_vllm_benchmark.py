"""benchmarks.peer_vllm without vLLM (its smoke run on CPU): parity's rows are all there and count what they ran."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_without_vllm_times_both_modes_and_says_vllm_is_absent(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.peer_vllm", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                         check=True, capture_output=True, text=True, timeout=900)
    res = json.loads((tmp_path / "peer_vllm.json").read_text())
    args = res["args"]
    assert res["vllm_absent"] == "--smoke runs parity alone" and not any(k.startswith("vllm/") for k in res)
    # workload B: one output length per prompt, U[4, 12] in the smoke run, drawn with seed 1
    lens_b = np.random.default_rng(1).integers(4, 12 + 1, size=args["num_prompts"])
    for mode in ("fast", "deterministic"):
        row = res[f"parity/{mode}/{args['max_model_lens'][0]}"]
        assert row["A"]["output_tokens"] == args["num_prompts"] * args["output_len"]
        assert row["B"]["output_tokens"] == int(lens_b.sum())
        assert row["ttft_ms"] > 0 and row["batch1_ms_per_token"] > 0
    table = [line for line in run.stdout.splitlines() if line.startswith("| workload A")]
    assert len(table) == 1 and table[0].split("|")[2].strip() == "-"  # vLLM's column empty, not made up


@pytest.mark.slow
def test_batch1_ab_runs_each_setting_in_turn(tmp_path):
    """benchmarks.batch1_ab's smoke run: each value of the variable gets its rounds of the peer benchmark's batch-1
    measure, in alternating order, and the table has a row per value."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.batch1_ab", "--smoke", "--out", str(tmp_path), "--rounds",
                          "2", "--env", "PARITY_PREFETCH=1,0"], cwd=ROOT, check=True, capture_output=True,
                         text=True, timeout=900)
    res = json.loads((tmp_path / "batch1_ab.json").read_text())
    assert res["env_name"] == "PARITY_PREFETCH" and list(res["runs"]) == ["1", "0"]
    for runs in res["runs"].values():
        assert len(runs) == 2 and all(r["error"] is None and r["batch1_ms_per_token"] > 0 for r in runs)
    order = [line.split()[0] for line in run.stdout.splitlines() if line.startswith("PARITY_PREFETCH=")]
    assert order == ["PARITY_PREFETCH=1", "PARITY_PREFETCH=0",
                     "PARITY_PREFETCH=0", "PARITY_PREFETCH=1"]
