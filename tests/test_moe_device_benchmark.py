"""benchmarks.moe_device: its decode-bytes model against an HF Qwen3-MoE's own parameters, and its smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from benchmarks.common import live_group_members, run_worker, stop_process_group
from benchmarks.moe_device import SMOKE, decode_step_bytes

ROOT = Path(__file__).resolve().parents[1]


def test_decode_bytes_are_the_models_weights_when_every_expert_is_hit():
    """With a batch that hits every expert and no context, a step reads every bf16 weight matrix once: the HF
    model's parameters less the embedding (one row is looked up) and the norm vectors."""
    layers = 3
    cfg = Qwen3MoeConfig(num_hidden_layers=layers, **SMOKE)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() > 1 and "embed_tokens" not in name)
    assert decode_step_bytes(SMOKE, layers, batch=10_000, context=0) == pytest.approx(2 * matrices, rel=1e-9)
    kv_per_token = 2 * layers * 2 * SMOKE["num_key_value_heads"] * SMOKE["head_dim"]  # k and v, bf16
    grown = decode_step_bytes(SMOKE, layers, batch=10_000, context=5) - decode_step_bytes(SMOKE, layers, 10_000, 0)
    assert grown == pytest.approx(10_000 * 5 * kv_per_token, rel=1e-9)


@pytest.mark.slow
def test_smoke_run_writes_every_part(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.moe_device", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                   check=True, capture_output=True, timeout=900)
    res = json.loads((tmp_path / "moe_device.json").read_text())
    args = res["args"]
    assert res["fast_workload_a"]["output_tokens"] == args["num_prompts"] * args["output_len"]
    for part in ("fast_det_prompts", "deterministic_det_prompts"):  # the same prompts, prefilled in both modes
        assert res[part]["output_tokens"] == args["det_prompts"] * args["output_len"]
    assert res["fast_det_prompts"]["steps"] == res["deterministic_det_prompts"]["steps"]
    assert res["deterministic_bitwise"] == {"alone_equals_batched": True, "trainer_max_abs_diff": 0.0,
                                            "trainer_bitwise": True}
    # batch 1 subtracts a timed prefill: on shared CPU cores with 4 decode steps its sign is noise, so only present
    assert {"fast_batch1_ms_per_token", "deterministic_batch1_ms_per_token"} <= set(res)
    assert {"batch1", "workload_a"} <= set(res["scaling_to_48_layers"])


def test_a_worker_that_exits_leaving_a_child_behind_has_the_child_killed(tmp_path):
    """vLLM's engine-core process outlives the worker's os._exit and kept the GPU memory that the parity engine
    started next needed (H200: a negative KV budget), and the worker's stdout pipe open: run_worker stops the
    worker's whole session and does not wait on the child's output."""
    code = ("import os, subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
            "print('ready', os.getpgrp(), flush=True); os._exit(0)")
    start = time.monotonic()
    run = run_worker([sys.executable, "-c", code], dict(os.environ), 60, tmp_path / "worker.log")
    assert run.returncode == 0 and time.monotonic() - start < 30
    assert "killed" in run.leftovers and run.output.startswith("ready")
    assert live_group_members(int(run.output.split()[1])) == []
    assert stop_process_group(int(run.output.split()[1])) == ""  # nothing left to stop
