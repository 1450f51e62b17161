"""benchmarks.async_rollout's smoke run (every mode, its token accounting) and the cost model in
benchmarks.rl_step_model (its event jumps against a step-by-step sum, and its token accounting)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.rl_step_model import Design, Workload, decode_work, simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_of_every_mode_keeps_every_decoded_token_in_the_partial_modes(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.async_rollout", "--smoke", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)
    res = json.loads((tmp_path / "async_rollout.json").read_text())
    assert set(res["vs_plain"]) == {"plain", "keep", "partial", "oversample"}
    assert res["kv_blocks_used_at_end"] == 0
    k, n = res["args"]["groups"], res["args"]["samples"]
    for mode in ("plain", "keep", "partial", "oversample"):
        assert all(row["groups"] == k for row in res[mode]["steps"])
    assert any(row["tokens_thrown_away"] > 0 for row in res["oversample"]["steps"])
    for mode in ("keep", "partial"):  # what was decoded is trained or still carried: nothing is lost
        steps = res[mode]["steps"]
        assert sum(r["tokens_generated"] for r in steps) == sum(r["tokens_trained"] for r in steps) + steps[-1]["tokens_carried"]
        assert all(r["tokens_thrown_away"] == 0 for r in steps)
    assert all(row["max_version_lag"] == 0 for row in res["plain"]["steps"])
    assert [u["mode"] for u in res["inflight_update"]] == ["keep", "recompute"]
    assert all(u["running_samples"] == (res["args"]["max_num_seqs"] // n) * n for u in res["inflight_update"])


def test_a_jump_of_k_decode_steps_costs_the_sum_of_its_steps():
    batch, context, steps = 7, 300, 11
    by_step = sum(np.array([1, batch, context + batch * i, 0]) for i in range(steps))
    assert np.array_equal(decode_work(steps, batch, context), by_step)


@pytest.mark.parametrize("design", [Design("plain", 64), Design("keep", 64, 12),
                                    Design("partial", 64, 12), Design("oversample", 64, 8)])
def test_the_simulated_engine_decodes_each_trained_token_once(design):
    """Sequence-steps (one token each) add up to the tokens trained plus those carried at the end (over-sampling:
    plus those thrown away, step by step)."""
    work = Workload(groups=6, samples=4, mean_len=40, max_tokens=200)
    rows = simulate(work, design, steps=5, warmup=0, seed=1)
    if design.mode == "oversample":
        assert all(r.work[1] == r.trained_tokens + r.thrown_away for r in rows)
        assert any(r.thrown_away > 0 for r in rows)
        return
    assert sum(r.work[1] for r in rows) == sum(r.trained_tokens for r in rows) + rows[-1].carried
    assert all(r.thrown_away == 0 for r in rows)
    if design.mode == "plain":
        assert all(r.carried == 0 and r.max_lag == 0 for r in rows)
    else:
        assert max(r.max_lag for r in rows) >= 1
