"""Rollout-vs-trainer mismatch metrics over a response mask, as one flat dict ready for logging.

log ρ_t = logp_train − logp_rollout, ρ_t = π_train(y_t) / π_rollout(y_t). Keys (prefix "mismatch/"),
with the meaning users know from verl (`mismatch/…`) and TRL (`sampling/…`):

  num_tokens, num_seqs                       tokens under the mask; sequences with at least one
  logp_abs_diff_mean, logp_abs_diff_max      mean / max |Δlogp| (TRL sampling_logp_difference/{mean,max})
  mismatch_kl                                k1 = mean(logp_rollout − logp_train) = mean(−log ρ) (verl)
  mismatch_k2_kl                             k2 = mean(½ (log ρ)²)
  mismatch_k3_kl                             k3 = mean(ρ − 1 − log ρ) (verl)
  ratio_mean, ratio_min, ratio_max           token ratio ρ (TRL importance_sampling_ratio/{mean,min,max})
  ratio_p01, ratio_p05, ratio_p50, ratio_p95, ratio_p99   quantiles of ρ (linear interpolation)
  ratio_fraction_outside                     fraction of tokens with ρ outside [0.5, 2] (`bounds`)
  ratio_fraction_high, ratio_fraction_low    ... above the upper bound / below the lower one
  seq_log_ratio_sum_{mean,abs_mean,min,max}  per-sequence Σ_t log ρ_t (log of the sequence-level ratio)
  mismatch_training_ppl, mismatch_rollout_ppl   batch mean of per-sequence exp(−mean_t logp) (verl)
  mismatch_log_ppl_diff                      mean over sequences of (mean logp_rollout − mean logp_train) (verl)
  mismatch_ppl_ratio                         mean over sequences of exp(that difference) (verl)
  prob_pearson                               Pearson correlation of exp(logp_rollout) and exp(logp_train)

Computed in float64. log ρ is clamped to ±20 before exp (verl's safety bound), so ρ-based keys
stay finite; the |Δlogp| and k1/k2 keys use the unclamped difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from parity.precision.checks import check_no_nan

LOG_RATIO_CLAMP = 20.0
RATIO_QUANTILES = (0.01, 0.05, 0.5, 0.95, 0.99)

LogprobsLike = torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[float]]


def pad_sequences(seqs: Sequence[torch.Tensor] | Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D per-sequence values into [B, T] float64 plus a bool mask."""
    rows = [torch.as_tensor(s, dtype=torch.float64).detach().reshape(-1).cpu() for s in seqs]
    width = max((r.numel() for r in rows), default=0)
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : r.numel()] = r
        mask[i, : r.numel()] = True
    return values, mask


def as_padded(
    logp_rollout: LogprobsLike, logp_train: LogprobsLike, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both inputs as float64 [B, T] on the CPU plus a bool mask; lists of 1-D tensors are padded."""
    if not isinstance(logp_rollout, torch.Tensor):
        if mask is not None:
            raise ValueError("pass either padded [B, T] tensors with a mask, or lists of per-sequence tensors")
        lr, mask_r = pad_sequences(logp_rollout)
        lt, mask_t = pad_sequences(logp_train)
        if lr.shape != lt.shape or not torch.equal(mask_r, mask_t):
            raise ValueError("rollout and trainer logprobs have different sequence counts or lengths")
        return lr, lt, mask_r
    lr = logp_rollout.detach().double().cpu()
    lt = logp_train.detach().double().cpu()
    if lr.shape != lt.shape:
        raise ValueError(f"logp_rollout {tuple(lr.shape)} and logp_train {tuple(lt.shape)} differ in shape")
    if lr.dim() == 1:
        lr, lt = lr[None], lt[None]
    m = torch.ones_like(lr, dtype=torch.bool) if mask is None else mask.detach().bool().cpu().reshape(lr.shape)
    return lr, lt, m


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation; with a constant input, 1.0 if the inputs are identical else nan."""
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    if denom == 0.0:
        return 1.0 if torch.equal(a, b) else float("nan")
    return float((da * db).sum()) / denom


def mismatch_metrics(
    logp_rollout: LogprobsLike,
    logp_train: LogprobsLike,
    mask: torch.Tensor | None = None,
    bounds: tuple[float, float] = (0.5, 2.0),
    prefix: str = "mismatch/",
) -> dict[str, float]:
    """Mismatch between rollout and trainer logprobs of the same tokens (see the module docstring).

    Inputs: padded [B, T] tensors plus a [B, T] mask (1 = response token), or lists of 1-D
    per-sequence tensors (mask None). Raises ValueError on an empty mask or nan logprobs.
    """
    lr, lt, m = as_padded(logp_rollout, logp_train, mask)
    if not bool(m.any()):
        raise ValueError("mismatch_metrics needs at least one token under the mask")
    check_no_nan(m, logp_rollout=lr, logp_train=lt)
    log_ratio = torch.where(m, lt - lr, torch.zeros_like(lr))
    flat = log_ratio[m]
    ratio = torch.exp(flat.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    lo, hi = bounds

    counts = m.sum(dim=1)
    has = counts > 0
    seq_sum = log_ratio.sum(dim=1)[has]
    mean_lt = (torch.where(m, lt, 0.0).sum(dim=1) / counts.clamp(min=1))[has]
    mean_lr = (torch.where(m, lr, 0.0).sum(dim=1) / counts.clamp(min=1))[has]
    log_ppl_diff = mean_lr - mean_lt

    out = {
        "num_tokens": float(flat.numel()),
        "num_seqs": float(has.sum()),
        "logp_abs_diff_mean": float(flat.abs().mean()),
        "logp_abs_diff_max": float(flat.abs().max()),
        "mismatch_kl": float((-flat).mean()),
        "mismatch_k2_kl": float((0.5 * flat * flat).mean()),
        "mismatch_k3_kl": float((ratio - 1 - flat.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).mean()),
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
    }
    qs = torch.quantile(ratio, torch.tensor(RATIO_QUANTILES, dtype=torch.float64))
    for q, v in zip(RATIO_QUANTILES, qs.tolist()):
        out[f"ratio_p{round(q * 100):02d}"] = v
    out.update({
        "ratio_fraction_outside": float(((ratio < lo) | (ratio > hi)).double().mean()),
        "ratio_fraction_high": float((ratio > hi).double().mean()),
        "ratio_fraction_low": float((ratio < lo).double().mean()),
        "seq_log_ratio_sum_mean": float(seq_sum.mean()),
        "seq_log_ratio_sum_abs_mean": float(seq_sum.abs().mean()),
        "seq_log_ratio_sum_min": float(seq_sum.min()),
        "seq_log_ratio_sum_max": float(seq_sum.max()),
        "mismatch_training_ppl": float(torch.exp(-mean_lt).mean()),
        "mismatch_rollout_ppl": float(torch.exp(-mean_lr).mean()),
        "mismatch_log_ppl_diff": float(log_ppl_diff.mean()),
        "mismatch_ppl_ratio": float(torch.exp(log_ppl_diff).mean()),
        "prob_pearson": _pearson(torch.exp(lr[m]), torch.exp(lt[m])),
    })
    return {prefix + k: v for k, v in out.items()}
