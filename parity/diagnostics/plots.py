"""PNG plots of a diagnosis (matplotlib, Agg, no pyplot state): one file per kind of plot, one panel
per pairing, so a run over three precisions still gives five images.

Exact zeros cannot sit on a log axis: |Δlogp| = 0 is drawn at a floor a decade under the smallest
non-zero value, and the axis label says so.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from parity.diagnostics.comparison import Pairing
from parity.diagnostics.report import WorstToken

PLOT_FILES = {
    "log_ratio_hist": "log_ratio_hist.png",
    "abs_diff_by_position": "abs_diff_by_position.png",
    "abs_diff_vs_prob": "abs_diff_vs_prob.png",
    "prob_scatter": "prob_scatter.png",
    "worst_tokens": "worst_tokens.png",
}


def _figure(n_panels: int, width: float = 4.2, height: float = 3.4):
    from matplotlib.figure import Figure

    cols = min(n_panels, 4)
    rows = max(1, math.ceil(n_panels / cols))
    w, h = width * cols, height * rows
    fig = Figure(figsize=(w, h))  # margins in inches (constrained layout costs ~0.3 s a panel)
    fig.subplots_adjust(left=0.8 / w, right=1 - 0.2 / w, bottom=0.6 / h, top=1 - 0.65 / h, wspace=0.4, hspace=0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _floor(values: np.ndarray) -> float:
    nonzero = values[(values > 0) & np.isfinite(values)]
    return float(nonzero.min()) / 10 if nonzero.size else 1e-12


def _save(fig, path: Path) -> Path:
    with warnings.catch_warnings():  # tokens from any script may lack a glyph in the default font
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.savefig(path, dpi=110)
    return path


def log_ratio_hist(pairings: list[Pairing], path: Path) -> Path:
    fig, axes = _figure(len(pairings))
    for ax, p in zip(axes, pairings):
        lr = p.log_ratio[np.isfinite(p.log_ratio)]
        lo, hi = (float(lr.min()), float(lr.max())) if lr.size else (0.0, 0.0)
        if hi <= lo:  # every token the same (e.g. bitwise agreement): a narrow bar around it
            pad = max(abs(lo) * 1e-3, 1e-9)
            lo, hi = lo - pad, hi + pad
        counts, edges = np.histogram(lr, bins=60, range=(lo, hi))
        ax.stairs(counts, edges, fill=True, color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(p.name, fontsize=9)
        ax.set_xlabel("log ratio  logp_train − logp_rollout")
        ax.set_ylabel("tokens")
        absd = np.abs(lr) if lr.size else np.zeros(1)
        ax.text(0.02, 0.97, f"mean |Δ| {absd.mean():.2e}\nmax |Δ| {absd.max():.2e}", transform=ax.transAxes,
                va="top", fontsize=8)
    fig.suptitle("Histogram of per-token log ratios")
    return _save(fig, path)


def abs_diff_by_position(pairings: list[Pairing], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    floor = _floor(np.concatenate([p.abs_diff for p in pairings])) if pairings else 1e-12
    for p in pairings:
        width = int(p.position.max()) + 1 if p.position.size else 0
        total = np.bincount(p.position, weights=np.nan_to_num(p.abs_diff), minlength=width)
        count = np.bincount(p.position, minlength=width)
        mean = np.maximum(total / np.maximum(count, 1), floor)
        ax.plot(np.arange(width), mean, label=p.name, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("output position")
    ax.set_ylabel(f"mean |Δlogp| over samples (0 drawn at {floor:.0e})")
    ax.set_title("|Δlogp| by position")
    ax.legend(fontsize=7)
    return _save(fig, path)


def abs_diff_vs_prob(pairings: list[Pairing], path: Path) -> Path:
    fig, axes = _figure(len(pairings))
    for ax, p in zip(axes, pairings):
        d = p.abs_diff
        floor = _floor(d)
        ax.scatter(np.exp(p.logp_rollout), np.maximum(d, floor), s=3, alpha=0.4, rasterized=True)
        ax.set_yscale("log")
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(p.name, fontsize=9)
        ax.set_xlabel("rollout probability of the token")
        ax.set_ylabel(f"|Δlogp| (0 drawn at {floor:.0e})")
    fig.suptitle("|Δlogp| against token probability")
    return _save(fig, path)


def prob_scatter(pairings: list[Pairing], path: Path) -> Path:
    fig, axes = _figure(len(pairings), width=3.8, height=3.8)
    for ax, p in zip(axes, pairings):
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
        ax.scatter(np.exp(p.logp_rollout), np.exp(p.logp_train), s=3, alpha=0.4, rasterized=True)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_title(p.name, fontsize=9)
        ax.set_xlabel(f"π_rollout ({p.rollout})")
        ax.set_ylabel(f"π_train ({p.train})")
    fig.suptitle("Rollout vs trainer probability of each sampled token")
    return _save(fig, path)


def worst_tokens_image(worst: list[WorstToken], path: Path, per_pairing: int = 5) -> Path:
    """The `per_pairing` worst tokens of each pairing, as monospace text with their context."""
    from matplotlib.figure import Figure

    lines = [f"{'pos':>4} {'sample':>6} {'logp_rollout':>12} {'logp_train':>11} {'log ratio':>10}  context"]
    printable = lambda text: "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    for name in dict.fromkeys(w.pairing for w in worst):
        lines.append(name)
        for w in [w for w in worst if w.pairing == name][:per_pairing]:
            context = printable(w.context)
            context = context if len(context) <= 100 else "…" + context[-99:]
            lines.append(f"{w.position:>4} {w.sample:>6} {w.logp_rollout:>12.4f} {w.logp_train:>11.4f} "
                         f"{w.log_ratio:>+10.2e}  {context}")
    fig = Figure(figsize=(13, 0.7 + 0.16 * len(lines)), layout="constrained")
    ax = fig.subplots()
    ax.axis("off")
    ax.set_title("Worst tokens by |Δlogp| (token in [[ ]], with context)", loc="left")
    ax.text(0, 1, "\n".join(lines), family="monospace", fontsize=8, va="top", transform=ax.transAxes)
    return _save(fig, path)


def write_plots(pairings: list[Pairing], worst: list[WorstToken], out_dir: Path) -> dict[str, Path]:
    """Every plot in PLOT_FILES, written under `out_dir`; returns name -> path."""
    return {
        "log_ratio_hist": log_ratio_hist(pairings, out_dir / PLOT_FILES["log_ratio_hist"]),
        "abs_diff_by_position": abs_diff_by_position(pairings, out_dir / PLOT_FILES["abs_diff_by_position"]),
        "abs_diff_vs_prob": abs_diff_vs_prob(pairings, out_dir / PLOT_FILES["abs_diff_vs_prob"]),
        "prob_scatter": prob_scatter(pairings, out_dir / PLOT_FILES["prob_scatter"]),
        "worst_tokens": worst_tokens_image(worst, out_dir / PLOT_FILES["worst_tokens"]),
    }
