"""RL loss helpers for a GRPO/PPO loop: group-relative advantages and the clipped policy loss.

Typical step (rollouts ordered by prompt, then sample, as `Engine.generate` returns them):

    adv = group_advantages(rewards, group_size=n)                         # [B]
    logp = torch.nn.utils.rnn.pad_sequence(token_logprobs(model, ...), batch_first=True)  # [B, T], grad
    old_logp = logp.detach()                                              # one update per batch
    corr = importance_weights(rollout_logp, old_logp, mask, ISConfig("tis"))
    loss, stats = policy_loss(logp, old_logp, adv, corr.mask, is_weights=corr.weights)
    loss.backward()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def group_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_size: int | None = None,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath): A_i = (r_i − mean_g r) / (std_g r + eps) within
    each group (std unbiased, as in verl and TRL); without `normalize_std` (Dr. GRPO), A_i = r_i − mean_g r.
    `rewards`: flat [N] with `group_size` consecutive samples per prompt, or [P, G] (one row per
    prompt, group_size None). A group of one gets advantage 0. float32, same shape as `rewards`."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if group_size is None:
        if r.dim() != 2:
            raise ValueError(f"rewards of shape {tuple(r.shape)}: pass group_size, or a [prompts, group] tensor")
        group_size = r.shape[1]
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
    groups = r.reshape(-1, group_size)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (groups.std(dim=1, keepdim=True) + eps)
    return adv.reshape(r.shape)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce a [B, T] per-token loss over `mask` (verl's `loss_agg_mode`):
    token-mean: Σ_bt L·m / Σ_bt m;  seq-mean-token-mean: mean_b (Σ_t L·m / Σ_t m);
    seq-mean-token-sum: mean_b Σ_t L·m. Sequences with no token under the mask are left out of the
    sequence means (e.g. vetoed ones)."""
    if agg not in AGG_MODES:
        raise ValueError(f"unknown aggregation {agg!r}; expected one of {', '.join(AGG_MODES)}")
    m = mask.to(per_token.dtype)
    if agg == "token-mean":
        return (per_token * m).sum() / m.sum().clamp(min=1)
    counts = m.sum(dim=-1)
    seq = (per_token * m).sum(dim=-1)
    if agg == "seq-mean-token-mean":
        seq = seq / counts.clamp(min=1)
    has = counts > 0
    return (seq * has).sum() / has.sum().clamp(min=1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    is_weights: torch.Tensor | None = None,
    agg: str = "token-mean",
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017), as GRPO uses it, with an optional rollout IS correction.

    r_t = exp(logp − old_logp) (trainer's current vs old policy; pass old_logp = logp.detach() for a
    single update per batch), A_t = advantages ([B] per sequence, or [B, T]):
        L_t = max(−A_t r_t, −A_t clip(r_t, 1 − clip_low, 1 + clip_high))
    clip_high = 0.28 is DAPO's clip-higher. `dual_clip` c (Ye et al. 2020, verl `clip_ratio_c`, e.g. 3):
    for A_t < 0, L_t = min(L_t, −c A_t). `is_weights` (detached, from `importance_weights`) multiply
    L_t after clipping and before aggregation (verl rollout IS, TRL vllm_importance_sampling); pass
    the mask returned with them. Returns (loss, stats): actor/pg_loss, actor/pg_clipfrac (tokens where
    the clipped branch is taken), actor/ppo_kl (mean old_logp − logp), actor/pg_clipfrac_lower (dual
    clip), actor/ratio_mean, and actor/is_weight_mean when weights are given.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    m = mask.bool()
    lower_frac = 0.0
    if dual_clip is not None:
        floor = -adv * dual_clip
        hit = (adv < 0) & (per_token > floor)
        per_token = torch.where(adv < 0, torch.minimum(per_token, floor), per_token)
        lower_frac = float((hit & m).sum() / m.sum().clamp(min=1))
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    loss = aggregate(per_token, m, agg)
    n = m.sum().clamp(min=1)
    with torch.no_grad():
        stats = {
            "actor/pg_loss": float(loss.detach()),
            "actor/pg_clipfrac": float(((clipped > unclipped) & m).sum() / n),
            "actor/ppo_kl": float((-log_ratio * m).sum() / n),
            "actor/pg_clipfrac_lower": lower_frac,
            "actor/ratio_mean": float((ratio * m).sum() / n),
        }
        if is_weights is not None:
            stats["actor/is_weight_mean"] = float((is_weights * m).sum() / n)
    return loss, stats
