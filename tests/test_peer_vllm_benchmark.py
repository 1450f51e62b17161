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
def test_batch1_ab_runs_each_setting_and_tables_it(tmp_path):
    """benchmarks.batch1_ab's smoke run (one round): each value of the variable gets the peer benchmark's batch-1
    measure in a process of its own, and the table has a row per value."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.batch1_ab", "--smoke", "--out", str(tmp_path), "--rounds",
                          "1", "--env", "PARITY_PREFETCH=1,0"], cwd=ROOT, check=True, capture_output=True, text=True,
                         timeout=900)
    res = json.loads((tmp_path / "batch1_ab.json").read_text())
    assert res["env_name"] == "PARITY_PREFETCH" and list(res["runs"]) == ["1", "0"]
    for runs in res["runs"].values():
        assert len(runs) == 1 and runs[0]["error"] is None and runs[0]["batch1_ms_per_token"] > 0
    rows = [line.split("|")[1].strip() for line in run.stdout.splitlines() if line.startswith("| ")][1:]
    assert rows == ["1", "0"]


def test_batch1_ab_alternates_the_order_between_rounds():
    from benchmarks.batch1_ab import run_order

    assert run_order(["24", "0"], 3) == ["24", "0", "0", "24", "24", "0"]
    assert run_order(["a", "b", "c"], 2) == ["a", "b", "c", "c", "b", "a"]
