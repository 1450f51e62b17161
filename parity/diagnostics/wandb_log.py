"""Log a diagnosis to Weights & Biases through the project's Tracker: every metric as a scalar
(`diagnose/<token set>/<rollout>_vs_<train>/<metric>`, also in the run summary), the metrics table
as a wandb.Table and the plots as images. Offline by default; `wandb sync <run dir>` uploads later.
"""

from __future__ import annotations

from pathlib import Path

from parity.diagnostics.comparison import Pairing
from parity.train.tracking import Tracker, TrackingConfig


def metric_key(p: Pairing, metric: str) -> str:
    return f"diagnose/{p.token_set}/{p.rollout}_vs_{p.train}/{metric}"


def log_diagnosis(report: dict, pairings: list[Pairing], plot_paths: dict[str, Path], project: str, mode: str,
                  out_dir: Path) -> Path | None:
    """One W&B run under `out_dir/tracking`; returns its run directory (None if W&B is unavailable)."""
    tracker = Tracker(TrackingConfig(mode=mode, project=project, name=f"diagnose-{report['command']}"),
                      report["config"], out_dir / "tracking")
    scalars = {metric_key(p, k): v for p in pairings for k, v in p.metrics.items()}
    tracker.log(scalars, step=0)
    if tracker.run is not None:
        import wandb

        columns = sorted(set().union(*(p.metrics for p in pairings)))
        table = wandb.Table(columns=["pairing", "num_tokens", *columns])
        for p in pairings:
            table.add_data(p.name, len(p.logp_rollout), *(p.metrics.get(c) for c in columns))
        images = {f"plots/{name}": wandb.Image(str(path)) for name, path in plot_paths.items()}
        tracker.run.log({"mismatch_table": table, **images}, step=0)
    run_dir = tracker.run_dir
    tracker.finish(scalars)
    return run_dir
