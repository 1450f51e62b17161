"""W&B tracking: an offline run is written to disk with config, history and summary (read back from
its run file); disabled or missing wandb changes nothing but the W&B files."""

from __future__ import annotations

import json
import sys

import pytest

from parity.train.tracking import Tracker, TrackingConfig, read_offline_run

CONFIG = {"lr": 0.001, "model": {"hidden_size": 64}, "task": "addition"}
STEPS = [{"reward/mean": 0.125, "response_length/mean": 3.0}, {"reward/mean": 0.5, "response_length/mean": 2.5},
         {"reward/mean": 0.875, "response_length/mean": 2.0}]


def log_run(tracker: Tracker) -> None:
    for step, metrics in enumerate(STEPS):
        tracker.log(metrics, step=step)
    tracker.finish({"final/reward_mean": 0.875})


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_offline_run_holds_config_history_and_summary(tmp_path):
    tracker = Tracker(TrackingConfig(mode="offline", project="parity-test", name="t1"), CONFIG, tmp_path)
    run_dir = tracker.run_dir
    assert run_dir is not None and run_dir.name.startswith("offline-run-")
    assert run_dir.parent == tmp_path / "wandb"
    log_run(tracker)

    run = read_offline_run(run_dir)
    assert run.config["lr"] == 0.001 and run.config["model"] == {"hidden_size": 64}
    assert [h["reward/mean"] for h in run.history] == [0.125, 0.5, 0.875]
    assert [h["_step"] for h in run.history] == [0, 1, 2]
    assert run.summary["reward/mean"] == 0.875
    assert run.summary["response_length/mean"] == 2.0
    assert run.summary["final/reward_mean"] == 0.875
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[1]["reward/mean"] == 0.5


def test_disabled_and_missing_wandb_still_record_locally(tmp_path, monkeypatch):
    disabled = Tracker(TrackingConfig(mode="disabled"), CONFIG, tmp_path / "off")
    assert disabled.run_dir is None
    log_run(disabled)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as on the device: `import wandb` fails
    with pytest.warns(UserWarning, match="wandb is not installed"):
        missing = Tracker(TrackingConfig(mode="offline"), CONFIG, tmp_path / "missing")
    log_run(missing)
    for sub in ("off", "missing"):
        assert not (tmp_path / sub / "wandb").exists()
        assert len(read_jsonl(tmp_path / sub / "metrics.jsonl")) == 3
        summary = json.loads((tmp_path / sub / "summary.json").read_text())
        assert summary["final/reward_mean"] == 0.875 and summary["reward/mean"] == 0.875


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="wandb mode"):
        TrackingConfig(mode="cloud")
