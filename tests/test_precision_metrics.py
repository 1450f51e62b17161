"""Mismatch metrics, IS corrections and the policy loss against formulas computed independently
(plain Python floats and math), plus a toy bandit where only the corrected estimator is unbiased."""

from __future__ import annotations

import math

import pytest
import torch

from parity.precision.importance_sampling import ISConfig, importance_weights
from parity.precision.metrics import mismatch_metrics
from parity.trainer.losses import aggregate, group_advantages, policy_loss

LN2 = math.log(2.0)


def _padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    values = torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float64)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.bool)
    return values, mask


# ------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    # Probabilities per sequence; token ratios ρ = 0.6, 1.5, 1, 8.
    p_rollout = [[0.5, 0.2], [0.5], [0.1]]
    p_train = [[0.3, 0.3], [0.5], [0.8]]
    m = mismatch_metrics([torch.tensor(r).log() for r in p_rollout], [torch.tensor(t).log() for t in p_train])
    pr = [x for r in p_rollout for x in r]
    pt = [x for r in p_train for x in r]
    lr = [math.log(b / a) for a, b in zip(pr, pt)]  # log ρ
    rho = [b / a for a, b in zip(pr, pt)]
    n = 4
    assert m["mismatch/num_tokens"] == n and m["mismatch/num_seqs"] == 3
    assert m["mismatch/logp_abs_diff_mean"] == pytest.approx(sum(abs(x) for x in lr) / n)
    assert m["mismatch/logp_abs_diff_max"] == pytest.approx(3 * LN2)  # ρ = 8
    assert m["mismatch/mismatch_kl"] == pytest.approx(-sum(lr) / n)  # mean(logp_rollout - logp_train)
    assert m["mismatch/mismatch_k2_kl"] == pytest.approx(sum(0.5 * x * x for x in lr) / n)
    assert m["mismatch/mismatch_k3_kl"] == pytest.approx(sum(r - 1 - x for r, x in zip(rho, lr)) / n)
    assert m["mismatch/ratio_mean"] == pytest.approx((0.6 + 1.5 + 1 + 8) / 4)
    assert (m["mismatch/ratio_min"], m["mismatch/ratio_max"]) == pytest.approx((0.6, 8.0))
    assert m["mismatch/ratio_p50"] == pytest.approx(1.25)  # median of 0.6, 1, 1.5, 8
    assert m["mismatch/ratio_fraction_outside"] == pytest.approx(0.25)  # only 8 is outside [0.5, 2]
    assert m["mismatch/ratio_fraction_high"] == pytest.approx(0.25) and m["mismatch/ratio_fraction_low"] == 0
    # Per-sequence Σ log ρ: log(0.9), 0, 3 ln2.
    assert m["mismatch/seq_log_ratio_sum_mean"] == pytest.approx((math.log(0.9) + 3 * LN2) / 3)
    assert m["mismatch/seq_log_ratio_sum_max"] == pytest.approx(3 * LN2)
    assert m["mismatch/seq_log_ratio_sum_min"] == pytest.approx(math.log(0.9))
    # verl perplexities: batch mean over sequences of exp(-mean logp).
    def ppl(seqs):
        return sum(math.exp(-sum(math.log(x) for x in s) / len(s)) for s in seqs) / len(seqs)
    assert m["mismatch/mismatch_training_ppl"] == pytest.approx(ppl(p_train))
    assert m["mismatch/mismatch_rollout_ppl"] == pytest.approx(ppl(p_rollout))
    diffs = [sum(math.log(x) for x in r) / len(r) - sum(math.log(x) for x in t) / len(t) for r, t in zip(p_rollout, p_train)]
    assert m["mismatch/mismatch_log_ppl_diff"] == pytest.approx(sum(diffs) / 3)
    assert m["mismatch/mismatch_ppl_ratio"] == pytest.approx(sum(math.exp(d) for d in diffs) / 3)
    mr, mt = sum(pr) / n, sum(pt) / n
    cov = sum((a - mr) * (b - mt) for a, b in zip(pr, pt))
    corr = cov / math.sqrt(sum((a - mr) ** 2 for a in pr) * sum((b - mt) ** 2 for b in pt))
    assert m["mismatch/prob_pearson"] == pytest.approx(corr)


def test_metrics_padded_equals_lists_and_identical_inputs_are_zero():
    g = torch.Generator().manual_seed(0)
    rows = [(-torch.rand(n, generator=g) * 3).tolist() for n in (5, 1, 7)]
    noisy = [[x + 0.01 * (i % 3 - 1) for i, x in enumerate(r)] for r in rows]
    lr, mask = _padded(rows)
    lt, _ = _padded(noisy)
    padded = mismatch_metrics(lr.float(), lt.float(), mask.long())
    listed = mismatch_metrics([torch.tensor(r) for r in rows], [torch.tensor(r) for r in noisy])
    assert padded.keys() == listed.keys()
    for k in padded:
        assert padded[k] == pytest.approx(listed[k], rel=1e-5, abs=1e-6), k
    same = mismatch_metrics(lr, lr, mask)
    assert same["mismatch/logp_abs_diff_max"] == 0 and same["mismatch/mismatch_k3_kl"] == 0
    assert same["mismatch/ratio_p01"] == same["mismatch/ratio_p99"] == 1 and same["mismatch/prob_pearson"] == 1


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="at least one token"):
        mismatch_metrics(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        mismatch_metrics(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="nan"):
        mismatch_metrics(torch.tensor([[float("nan")]]), torch.zeros(1, 1))


# --------------------------------------------------------------------------------------- IS weights
# Crafted token ratios (sequence 1 has two tokens, the rest is padding).
RATIOS = [[0.3, 1.0, 2.5, 5e-5], [1.2, 0.9]]


def _crafted():
    rollout, mask = _padded([[-1.0] * len(r) for r in RATIOS])
    train, _ = _padded([[-1.0 + math.log(x) for x in r] for r in RATIOS])
    return rollout.float(), train.float(), mask.float()


def _expected(method: str, lo: float, hi: float, veto: float | None = None):
    """Weights and mask straight from the formulas, with Python floats."""
    weights, keep = [], []
    for r in RATIOS:
        log_sum = sum(math.log(x) for x in r)
        seq_ratio = {"seq": math.exp(log_sum), "geo": math.exp(log_sum / len(r))}.get(method[:3])
        vetoed = veto is not None and any(x < veto for x in r)
        w_row, k_row = [], []
        for x in r:
            rho = seq_ratio if seq_ratio is not None else x
            inside = lo <= rho <= hi
            if method.endswith("tis"):
                w, k = min(rho, hi), True
            elif method.endswith("mis"):
                w, k = rho, inside
            elif method == "icepop":
                w, k = (rho if inside else 0.0), True
            else:
                w, k = 1.0, True
            k = k and not vetoed
            w_row.append(w if k else 0.0)
            k_row.append(k)
        weights.append(w_row + [0.0] * (4 - len(r)))
        keep.append(k_row + [False] * (4 - len(r)))
    return torch.tensor(weights), torch.tensor(keep)


@pytest.mark.parametrize(
    "config",
    [ISConfig("tis"), ISConfig("tis", upper=1.1), ISConfig("mis"), ISConfig("icepop"), ISConfig("seq-tis"),
     ISConfig("seq-mis", upper=1.5, lower=0.5), ISConfig("geo-tis"), ISConfig("geo-mis", upper=1.2),
     ISConfig("tis", veto_threshold=1e-4), ISConfig("icepop", veto_threshold=1e-4), ISConfig("none")],
    ids=lambda c: f"{c.method}-{c.upper}-{c.veto_threshold}",
)
def test_is_weights_match_formula(config):
    rollout, train, mask = _crafted()
    lo, hi = config.bounds
    out = importance_weights(rollout, train, mask, config)
    want_w, want_keep = _expected(config.method, lo, hi, config.veto_threshold)
    torch.testing.assert_close(out.weights, want_w, rtol=1e-5, atol=1e-7)
    assert torch.equal(out.mask.bool(), want_keep) and out.mask.dtype == mask.dtype
    assert not out.weights.requires_grad
    s = out.stats
    flat = [x for r in RATIOS for x in r]
    if config.level == "token":
        assert s["mismatch/rollout_is_max"] == pytest.approx(max(flat))
        assert s["mismatch/rollout_is_min"] == pytest.approx(min(flat))
        assert s["mismatch/rollout_is_mean"] == pytest.approx(sum(flat) / len(flat))
        assert s["mismatch/rollout_is_ratio_fraction_high"] == pytest.approx(sum(x > hi for x in flat) / 6)
    kept = want_w[want_keep].double()
    assert s["mismatch/rollout_is_eff_sample_size"] == pytest.approx(float(kept.sum() ** 2 / (kept.numel() * (kept**2).sum())))
    assert s["mismatch/rollout_is_kept_fraction"] == pytest.approx(float(want_keep.sum()) / 6)
    vetoed = config.veto_threshold is not None
    assert s["mismatch/rollout_is_veto_fraction"] == (0.5 if vetoed else 0.0)


def test_is_defaults_and_validation():
    assert ISConfig("tis").bounds == (0.5, 2.0)
    assert ISConfig("icepop").bounds == (0.5, 5.0)
    assert ISConfig("geo-mis").bounds == pytest.approx((1 / 1.001, 1.001))
    assert ISConfig("seq-tis").level == "sequence" and ISConfig("geo-tis").level == "geometric"
    with pytest.raises(ValueError, match="unknown IS method"):
        ISConfig("truncated")
    with pytest.raises(ValueError, match="lower < upper"):
        ISConfig("mis", upper=1.0, lower=2.0)


def test_is_log_ratio_is_clamped_before_exp():
    rollout = torch.tensor([[-200.0, -1.0]])
    train = torch.tensor([[-1.0, -1.0]])  # log ρ = 199 on token 0
    out = importance_weights(rollout, train, torch.ones(1, 2), ISConfig("seq-mis", upper=1e12))
    assert math.isfinite(out.stats["mismatch/rollout_is_max"])
    assert out.stats["mismatch/rollout_is_max"] == pytest.approx(math.exp(20), rel=1e-5)


# ----------------------------------------------------------------------------------------- the loss
def test_group_advantages():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], group_size=3)
    g = [1.0, 0.0, 0.0]
    mean = sum(g) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in g) / 2)
    torch.testing.assert_close(adv[:3], torch.tensor([(x - mean) / (std + 1e-6) for x in g]))
    assert torch.equal(adv[3:], torch.zeros(3))  # an all-equal group carries no signal
    torch.testing.assert_close(group_advantages([3.0, 1.0], 2, normalize_std=False), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1.0, 2.0, 3.0], 4)


def test_policy_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 4, generator=g) * 2).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(3, 4, generator=g)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    w = torch.rand(3, 4, generator=g) * 2
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        loss, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, is_weights=w, agg=agg)
        per, clipped_count = {}, 0
        for b in range(3):
            for t in range(4):
                if not mask[b, t]:
                    continue
                r = math.exp(float(logp[b, t].detach() - old[b, t]))
                a = float(adv[b])
                clipped = -a * min(max(r, 0.8), 1.28)
                clipped_count += clipped > -a * r
                per[b, t] = max(-a * r, clipped) * float(w[b, t])
        if agg == "token-mean":
            want = sum(per.values()) / len(per)
        else:
            seqs = [[v for (b, _), v in per.items() if b == i] for i in range(3)]
            want = sum(sum(s) / (len(s) if agg == "seq-mean-token-mean" else 1) for s in seqs) / 3
        assert float(loss.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert stats["actor/pg_clipfrac"] == pytest.approx(clipped_count / len(per))
    assert aggregate(torch.ones(2, 2), torch.tensor([[1, 1], [0, 0]]), "seq-mean-token-sum") == 2.0  # empty row left out


def test_dual_clip_bounds_negative_advantage_loss():
    logp = torch.tensor([[2.0]], requires_grad=True)  # ratio e^2 ≈ 7.4 against old_logp 0
    loss, stats = policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=3.0)
    assert float(loss.detach()) == pytest.approx(3.0) and stats["actor/pg_clipfrac_lower"] == 1.0


# ---------------------------------------------------------------------------------- the toy bandit
def test_bandit_corrected_gradient_converges_to_on_policy_gradient():
    """A 5-armed bandit with π_train = softmax(θ) and a mismatched π_rollout. The policy gradient
    estimated from rollout samples converges to ∇_θ E_{π_train}[r] only with the IS correction."""
    theta = torch.tensor([0.5, -0.3, 0.2, 0.0, -0.6])
    delta = torch.tensor([0.4, -0.3, 0.0, 0.3, -0.4])  # rollout engine's logit error: ρ within [0.5, 2]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0])
    pi_train = torch.softmax(theta, 0)
    pi_rollout = torch.softmax(theta + delta, 0)
    assert float((pi_train / pi_rollout).max()) < 2 and float((pi_train / pi_rollout).min()) > 0.5
    true_grad = pi_train * (rewards - (pi_train * rewards).sum())  # ∇_θ Σ_a π(a) r(a)

    def estimate(num: int, seed: int, config: ISConfig | None):
        g = torch.Generator().manual_seed(seed)
        arms = torch.multinomial(pi_rollout, num, replacement=True, generator=g)
        th = theta.clone().requires_grad_()
        logp = torch.log_softmax(th, 0)[arms][:, None]  # [N, 1]: one-token "sequences"
        mask = torch.ones(num, 1)
        weights = None
        if config is not None:
            corr = importance_weights(torch.log(pi_rollout)[arms][:, None], logp.detach(), mask, config)
            weights, mask = corr.weights, corr.mask
        loss, _ = policy_loss(logp, logp.detach(), rewards[arms], mask, is_weights=weights)
        (grad,) = torch.autograd.grad(-loss, th)
        return grad

    # Per-sample estimate X = w r (e_a − π_train), a ~ π_rollout; standard error of the mean sqrt(tr Cov X / N).
    def standard_error(num: int, weights: torch.Tensor) -> float:
        xs = (weights * rewards)[:, None] * (torch.eye(5) - pi_train)  # X for each arm
        mean = (pi_rollout[:, None] * xs).sum(0)
        return math.sqrt(float((pi_rollout[:, None] * (xs - mean) ** 2).sum()) / num)

    rho = pi_train / pi_rollout
    biased = pi_rollout * rewards - (pi_rollout * rewards).sum() * pi_train  # E_rollout[r ∇log π_train]
    for num in (1_000, 50_000):
        corrected = estimate(num, 1, ISConfig("tis"))
        uncorrected = estimate(num, 1, None)
        assert float((corrected - true_grad).norm()) < 4 * standard_error(num, rho)
        assert float((uncorrected - biased).norm()) < 4 * standard_error(num, torch.ones(5))
    # At 50k samples the corrected estimate is within 8% of the true gradient (4 standard errors); the
    # uncorrected one converges to a gradient off by half its size.
    assert 4 * standard_error(50_000, rho) < 0.08 * float(true_grad.norm())
    assert float((biased - true_grad).norm()) > 0.4 * float(true_grad.norm())


def test_api_conveniences():
    rewards = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    torch.testing.assert_close(group_advantages(rewards), group_advantages(rewards.flatten(), 2).view(2, 2))
    rollout, train, mask = _crafted()
    by_name = importance_weights(rollout, train, mask, "mis")
    assert torch.equal(by_name.weights, importance_weights(rollout, train, mask, ISConfig("mis")).weights)
    with pytest.raises(TypeError):  # everything after the mask is keyword-only
        policy_loss(train, train, torch.ones(2), mask, by_name.weights)


@pytest.mark.parametrize("method", ["tis", "mis", "seq-tis", "geo-mis", "icepop"])
def test_importance_weights_reject_nan_like_mismatch_metrics(method):
    lr, lt, mask = torch.full((2, 3), -1.0), torch.full((2, 3), -1.2), torch.tensor([[1, 1, 0], [1, 1, 1]])
    lt[1, 2] = float("nan")
    message = r"nan in logp_train under the mask \(1 token\(s\), first at \[1, 2\]\)"
    with pytest.raises(ValueError, match=message):
        importance_weights(lr, lt, mask, method)
    with pytest.raises(ValueError, match=message):
        mismatch_metrics(lr, lt, mask)
    lt[1, 2], lr[0, 2] = -1.2, float("nan")  # NaN in padding is ignored
    assert importance_weights(lr, lt, mask, method).stats == importance_weights(lr.nan_to_num(), lt, mask, method).stats
