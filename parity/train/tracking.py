"""Experiment tracking: Weights & Biases when available (offline by default: no network needed),
plus a local `metrics.jsonl` that is always written, so a run without wandb (the device has none)
keeps its numbers.

One `Tracker` per experiment = one W&B run: the config is logged at start, every step's flat metric
dict with `log`, and `finish(summary)` writes the end-of-run summary. `--wandb-mode disabled` or a
missing `wandb` package turn W&B off and nothing else changes.

`read_offline_run` reads an offline run's `run-*.wandb` file back (config, history, final summary)
without the network, for tests and for diagnostics of runs that were never synced.
"""

from __future__ import annotations

import json
import math
import struct
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class TrackingConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "parity"
    name: str | None = None  # run name; default: W&B's
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"unknown wandb mode {self.mode!r}; expected one of {', '.join(WANDB_MODES)}")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """Logs to W&B (if enabled and installed) and to `out_dir/metrics.jsonl`."""

    def __init__(self, config: TrackingConfig, run_config: dict[str, Any], out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.summary: dict[str, Any] = {}
        self.mode = config.mode
        self.run = None
        if config.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed: tracking only to metrics.jsonl", stacklevel=2)
            return
        self.run = wandb.init(
            mode=config.mode,
            project=config.project,
            name=config.name,
            tags=config.tags or None,
            dir=str(self.out_dir),
            config=run_config,
        )

    @property
    def run_dir(self) -> Path | None:
        """The W&B run directory (`.../wandb/offline-run-*`), None without W&B."""
        return None if self.run is None else Path(self.run.dir).parent

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {k: _jsonable(v) for k, v in metrics.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        self.summary.update(row)
        if self.run is not None:
            self.run.log(row, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Write the end-of-run summary (merged over the last logged values) and close the run."""
        summary = {k: _jsonable(v) for k, v in (summary or {}).items()}
        self.summary.update(summary)
        (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        if self.run is not None:
            for k, v in summary.items():
                self.run.summary[k] = v
            run_dir = self.run_dir
            self.run.finish()
            self.run = None
            if run_dir is not None and self.mode == "offline":
                _wait_until_closed(run_dir)


@dataclass
class OfflineRun:
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]


def _wandb_records(path: Path):
    """Records of a `.wandb` file: a 7-byte ":W&B" header, then LevelDB-log framing (32 KiB blocks,
    each record chunk with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (kind == 0 and length == 0) or pos + 7 + length > len(data):  # end, or a record still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _wait_until_closed(run_dir: Path, timeout_s: float = 30.0) -> None:
    """`run.finish()` can return before W&B's service has flushed the run file; wait for its exit record."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        files = sorted(run_dir.glob("run-*.wandb"))
        if files and any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(files[0])):
            return
        time.sleep(0.1)
    warnings.warn(f"W&B run file in {run_dir} was not closed within {timeout_s:.0f} s", stacklevel=2)


def _items(updates) -> dict[str, Any]:
    return {(u.key or "/".join(u.nested_key)): json.loads(u.value_json) for u in updates}


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Config, per-step history and final summary of an offline W&B run directory."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    return OfflineRun(config, history, summary)
