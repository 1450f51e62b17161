"""Importance-sampling corrections for rollout/trainer mismatch, as detached per-token loss weights.

ρ_t = π_train(y_t) / π_rollout(y_t) = exp(logp_train − logp_rollout); log ρ is clamped to ±20 before
any exp (verl's safety bound). The weights multiply the per-token policy loss after PPO clipping and
before aggregation (`parity.trainer.losses.policy_loss`); the returned mask replaces the loss
mask, so rejected tokens also leave the loss denominator.

Methods (`ISConfig.method`), with defaults for `upper` / `lower`:

  "tis"     token truncated IS:  w_t = min(ρ_t, C), C = upper = 2.
            Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"
            (the TIS blog); verl `tis_imp_ratio_cap`; TRL `vllm_importance_sampling_cap`.
  "mis"     token masked IS: token t leaves the mask if ρ_t ∉ [lo, hi] (hi = 2, lo = 1/hi), otherwise
            w_t = ρ_t. verl `rollout_is_mode=mask` at token level (rejected tokens leave the denominator).
  "icepop"  two-sided masking: w_t = ρ_t if α ≤ ρ_t ≤ β else 0 (α = lower = 0.5, β = upper = 5); the
            mask is kept, so zeroed tokens still count in the denominator. Ring-1T / IcePop
            (arXiv 2510.18855), as in AReaL and rllm.
  "seq-tis" sequence IS, truncated: w = min(exp(Σ_t log ρ_t), hi) on every token of the sequence (hi = 2).
  "seq-mis" sequence IS, masked: the whole sequence leaves the mask if exp(Σ_t log ρ_t) ∉ [lo, hi],
            otherwise w = exp(Σ_t log ρ_t). verl `rollout_is_level=sequence`; TRL
            `vllm_importance_sampling_mode` = sequence_truncate / sequence_mask (TRL's cap default 3).
  "geo-tis" / "geo-mis"  the geometric-mean variant: exp(mean_t log ρ_t) in place of the product,
            then truncate / mask with tight bounds (hi = 1.001, lo = 1/hi). verl `rollout_is_level=geometric`.
  "none"    w_t = 1 (still applies the veto, and reports stats).

Veto (any method, `veto_threshold` τ, verl's default 1e-4 when on): a sequence with any ρ_t < τ leaves
the mask entirely. verl `rollout_is_veto_threshold`.

Stats use verl's names (prefix "mismatch/rollout_is_"): mean / max / min of the ratio at the chosen
level before truncation or masking, over the input mask; eff_sample_size = (Σw)² / (N Σw²) of the
applied weights over the kept tokens (1 = no loss of samples); ratio_fraction_high / _low (above
upper / below lower); masked_fraction (tokens the method rejected) and seq_masked_fraction
(sequences with any rejected token); zeroed_fraction (IcePop's zero weights); veto_fraction
(sequences vetoed) and catastrophic_token_fraction; kept_fraction (tokens left in the mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from parity.precision.checks import check_no_nan

IS_METHODS = ("none", "tis", "mis", "icepop", "seq-tis", "seq-mis", "geo-tis", "geo-mis")
_DEFAULT_UPPER = {"tis": 2.0, "mis": 2.0, "icepop": 5.0, "seq-tis": 2.0, "seq-mis": 2.0, "geo-tis": 1.001,
                  "geo-mis": 1.001, "none": 2.0}


@dataclass(frozen=True)
class ISConfig:
    """Which correction, its bounds (None = the method's default, see the module docstring), an
    optional veto threshold, and the clamp on log ρ before exp."""

    method: str = "tis"
    upper: float | None = None
    lower: float | None = None
    veto_threshold: float | None = None
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        if self.method not in IS_METHODS:
            raise ValueError(f"unknown IS method {self.method!r}; expected one of {', '.join(IS_METHODS)}")
        lo, hi = self.bounds
        if not 0 <= lo < hi:
            raise ValueError(f"IS bounds must satisfy 0 <= lower < upper, got lower={lo}, upper={hi}")
        if self.veto_threshold is not None and not self.veto_threshold > 0:
            raise ValueError(f"veto_threshold must be positive, got {self.veto_threshold}")

    @property
    def level(self) -> str:
        """"token", "sequence" or "geometric"."""
        if self.method.startswith("seq-"):
            return "sequence"
        return "geometric" if self.method.startswith("geo-") else "token"

    @property
    def bounds(self) -> tuple[float, float]:
        """(lower, upper) with defaults filled in: lower = 1/upper, except IcePop's α = 0.5."""
        hi = self.upper if self.upper is not None else _DEFAULT_UPPER[self.method]
        default_lo = 0.5 if self.method == "icepop" else 1.0 / hi
        return (self.lower if self.lower is not None else default_lo), hi


class ISWeights(NamedTuple):
    weights: torch.Tensor  # float32 [B, T], detached; 0 wherever `mask` is 0
    mask: torch.Tensor  # [B, T] (input mask's dtype): the input mask minus rejected tokens/sequences
    stats: dict[str, float]


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    n = int(m.sum())
    return float((x.double() * m).sum() / n) if n else 0.0


@torch.no_grad()
def importance_weights(
    logp_rollout: torch.Tensor, logp_train: torch.Tensor, mask: torch.Tensor, config: ISConfig | str | None = None
) -> ISWeights:
    """IS weights, updated loss mask and stats for [B, T] logprobs of the same tokens (see module docstring).

    Argument order as in `mismatch_metrics`: rollout (engine) logprobs first, trainer logprobs second.
    `config` may be a method name ("tis", "mis", ...) for its defaults.
    """
    config = ISConfig(config) if isinstance(config, str) else (config or ISConfig())
    if logp_rollout.shape != logp_train.shape or logp_rollout.shape != mask.shape or logp_rollout.dim() != 2:
        raise ValueError(f"expected [B, T] logp_rollout, logp_train and mask of one shape, got "
                         f"{tuple(logp_rollout.shape)}, {tuple(logp_train.shape)}, {tuple(mask.shape)}")
    m = mask.bool()
    if not bool(m.any()):
        raise ValueError("importance_weights needs at least one token under the mask")
    check_no_nan(m, logp_rollout=logp_rollout, logp_train=logp_train)
    lo, hi = config.bounds
    clamp = config.log_ratio_clamp
    log_ratio = torch.where(m, logp_train.detach().float() - logp_rollout.detach().float(), 0.0)
    counts = m.sum(dim=-1, keepdim=True)
    if config.level == "token":
        log_w = log_ratio
    elif config.level == "sequence":
        log_w = log_ratio.sum(dim=-1, keepdim=True).expand_as(log_ratio)
    else:
        log_w = (log_ratio.sum(dim=-1, keepdim=True) / counts.clamp(min=1)).expand_as(log_ratio)
    ratio = torch.exp(log_w.clamp(-clamp, clamp))
    inside = (ratio >= lo) & (ratio <= hi)

    keep = m.clone()
    weights = ratio
    masking = config.method in ("mis", "seq-mis", "geo-mis")
    if config.method == "none":
        weights = torch.ones_like(ratio)
    elif config.method.endswith("tis"):
        weights = ratio.clamp(max=hi)
    elif masking:
        keep &= inside
    elif config.method == "icepop":
        weights = torch.where(inside, ratio, 0.0)
    rejected = m & ~keep
    vetoed_tokens = torch.zeros_like(m)
    if config.veto_threshold is not None:
        vetoed_tokens = (log_ratio < math.log(config.veto_threshold)) & m
        keep &= ~vetoed_tokens.any(dim=-1, keepdim=True)
    weights = torch.where(keep, weights, 0.0).float()

    seqs = m.any(dim=-1)
    kept_w = weights[keep].double()
    stats = {
        "mean": _masked_mean(ratio, m),
        "max": float(ratio[m].max()),
        "min": float(ratio[m].min()),
        "eff_sample_size": float(kept_w.sum() ** 2 / (kept_w.numel() * (kept_w**2).sum()))
        if kept_w.numel() and float((kept_w**2).sum()) > 0 else 0.0,
        "ratio_fraction_high": _masked_mean(ratio > hi, m),
        "ratio_fraction_low": _masked_mean(ratio < lo, m),
        "masked_fraction": _masked_mean(rejected, m),
        "seq_masked_fraction": float(rejected.any(dim=-1)[seqs].double().mean()),
        "zeroed_fraction": _masked_mean(~inside, m) if config.method == "icepop" else 0.0,
        "veto_fraction": float(vetoed_tokens.any(dim=-1)[seqs].double().mean()),
        "catastrophic_token_fraction": _masked_mean(vetoed_tokens, m),
        "kept_fraction": _masked_mean(keep, m),
    }
    return ISWeights(weights, keep.to(mask.dtype), {f"mismatch/rollout_is_{k}": v for k, v in stats.items()})
