"""benchmarks/trl_grpo.py on CPU with the real TRL and the tiny model: what a cut GPU run must keep.

A budget smaller than one step stops every mode after its first step; the JSON on disk then holds that
step's timings, reward and TRL's sampling metrics, and the exact mode's logged logp difference is 0.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from benchmarks import trl_grpo  # noqa: E402


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trl_bench") / "trl_grpo.json"
    argv = ["--smoke", "--modes", "parity-exact,parity-fast", "--budget-s", "0.01", "--out", str(out),
            "--runs-dir", str(out.parent / "runs")]
    return trl_grpo.main(argv), json.loads(out.read_text())


def test_budget_stops_each_mode_after_the_step_that_passes_it(cut_run):
    rc, result = cut_run
    assert rc == 0
    assert [r["mode"] for r in result["runs"]] == ["parity-exact", "parity-fast"]  # the order asked for
    for run in result["runs"]:
        assert run["max_steps"] == 2 and run["stopped_by_budget"]
        assert [s["step"] for s in run["steps"]] == [1]
        step = run["steps"][0]
        assert step["step_s"] >= step["gen_s"] + step["sync_s"] > 0 and step["train_s"] > 0
        assert step["reward"] is not None and "sampling/importance_sampling_ratio/mean" in step


def test_exact_mode_records_a_zero_logp_difference_at_every_step(cut_run):
    _, result = cut_run
    exact, fast = result["runs"]
    assert exact["steps"][0]["logp_difference_zero"] and exact["exact_logp_difference_zero_every_step"]
    assert exact["engine"]["deterministic"] and not fast["engine"]["deterministic"]
    assert "logp_difference_zero" not in fast["steps"][0]


@pytest.mark.parametrize("argv, message", [
    (["--modes", "parity-fast,vllm"], "--modes: unknown mode(s) ['vllm']"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--budget-s", "-1"], "--budget-s must be > 0, got -1.0"),
])
def test_bad_arguments_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit):
        trl_grpo.parse_args(argv)
    assert message in capsys.readouterr().err
