"""RL math against plain-Python reference computations."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from alignment.rl import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    group_advantages,
    group_token_advantages,
    kl_k1,
    kl_k3,
    kl_shaped_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
)


def python_gae(rewards, values, length, gamma, lam):
    """Textbook reverse loop over one episode of ``length`` steps; terminal value 0."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values[:length], strict=True)]


def test_gae_matches_python_loop_with_right_padding():
    gen = torch.Generator().manual_seed(3)
    B, T = 4, 7
    lengths = [7, 3, 1, 5]
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    # Garbage at padding must not leak into the result.
    rewards_noisy = rewards.masked_fill(mask == 0, 1e3)
    values_noisy = values.masked_fill(mask == 0, -1e3)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards_noisy, values_noisy, mask, gamma, lam)
    for b, n in enumerate(lengths):
        want_adv, want_ret = python_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(want_adv, rel=1e-12, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx(want_ret, rel=1e-12, abs=1e-12)
        assert adv[b, n:].abs().sum().item() == 0 and ret[b, n:].abs().sum().item() == 0


def test_gae_special_cases_by_hand():
    # gamma = lam = 1: advantage = sum of future rewards minus the current value.
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.25, 0.75]])
    adv, ret = gae(r, v, torch.ones(1, 3), 1.0, 1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, 0.75, 0.25])
    assert ret.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])
    # lam = 0: one-step TD errors.
    adv0, _ = gae(r, v, torch.ones(1, 3), 0.5, 0.0)
    assert adv0.tolist()[0] == pytest.approx([0.0 + 0.5 * 0.25 - 0.5, 0.0 + 0.5 * 0.75 - 0.25, 1.0 - 0.75])
    with pytest.raises(ValueError, match="shapes"):
        gae(r, v[:, :2], torch.ones(1, 3), 1.0, 1.0)


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 50.0, 60.0, 70.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kept = [1.0, 2.0, 3.0, 4.0]
    assert masked_mean(x, mask).item() == pytest.approx(statistics.mean(kept))
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    assert masked_var(x, mask).item() == pytest.approx(statistics.variance(kept))
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(statistics.pvariance(kept))
    w = masked_whiten(x, mask)
    vals = w[mask.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert vals.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    assert w[~mask.bool()].abs().sum().item() == 0
    ws = masked_whiten(x, mask, shift_mean=False)
    assert ws[mask.bool()].mean().item() == pytest.approx(statistics.mean(kept))
    assert ws[mask.bool()].std().item() == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_k1(lp, ref).tolist() == pytest.approx([0.5, -1.0])
    want = [(math.exp(-0.5) - 1) + 0.5, (math.exp(1.0) - 1) - 1.0]
    assert kl_k3(lp, ref).tolist() == pytest.approx(want, rel=1e-6)


def test_kl_estimators_are_unbiased_on_samples():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    idx = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = p.log()[idx], q.log()[idx]
    assert kl_k1(lp, lq).mean().item() == pytest.approx(true_kl, abs=0.01)
    assert kl_k3(lp, lq).mean().item() == pytest.approx(true_kl, abs=0.01)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    # KL 9 -> error clip(0.5) = 0.2; coef 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024
    assert ctl.update(9.0, 256) == pytest.approx(0.201024)
    # KL 4.5 -> error -0.25 clipped to -0.2
    assert ctl.update(4.5, 256) == pytest.approx(0.201024 * (1 - 0.2 * 256 / 10000))
    # KL 6.6 -> error 0.1, unclipped
    before = ctl.value
    assert ctl.update(6.6, 1000) == pytest.approx(before * (1 + 0.1 * 0.1))
    other = AdaptiveKLController(1.0, 6.0, 10000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05 and fixed.value == 0.05


def test_kl_shaped_rewards_places_score_at_last_token():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -0.25, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator="k1")
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 0.1 + 2.0])
    assert rewards.tolist()[1] == pytest.approx([-0.05, 0.025 - 1.0, 0.0])
    assert kl.tolist()[1] == pytest.approx([0.5, -0.25, 0.0])
    r3, kl3 = kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator="k3")
    assert kl3[0, 0].item() == pytest.approx(math.exp(-0.5) - 1 + 0.5, rel=1e-6)
    assert (kl3 >= 0).all()
    with pytest.raises(ValueError, match="estimator"):
        kl_shaped_rewards(scores, lp, ref, mask, kl_coef=0.1, estimator="k9")


def test_group_advantages_by_hand():
    r = [1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]
    g = group_advantages(torch.tensor(r, dtype=torch.float64), group_size=4, kind="grpo")
    mu, sd = statistics.mean(r[:4]), statistics.stdev(r[:4])
    assert g[:4].tolist() == pytest.approx([(x - mu) / (sd + 1e-4) for x in r[:4]])
    assert g[4:].tolist() == [0.0] * 4  # a tied group carries no signal
    g_dr = group_advantages(torch.tensor(r), group_size=4, kind="grpo", scale_by_std=False)
    assert g_dr[:4].tolist() == pytest.approx([x - mu for x in r[:4]])
    rl = group_advantages(torch.tensor(r), group_size=4, kind="rloo")
    assert rl[:4].tolist() == pytest.approx([x - (sum(r[:4]) - x) / 3 for x in r[:4]])
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.tensor(r[:7]), group_size=4)


def test_group_token_advantages_match_a_python_loop():
    """Reward to go of the group-centred token rewards, against loops over plain lists."""
    gen = torch.Generator().manual_seed(5)
    G, T = 3, 5
    lengths = [5, 2, 4, 3, 3, 1]  # two groups of three, right-padded
    rewards = torch.randn(len(lengths), T, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    noisy = rewards.masked_fill(mask == 0, 1e3)  # padding must not leak in
    for scale in (False, True):
        got = group_token_advantages(noisy, mask, G, scale_by_std=scale)
        for g in range(len(lengths) // G):
            rows = range(g * G, g * G + G)
            vals = [float(rewards[i, t]) for i in rows for t in range(lengths[i])]
            mu, sd = statistics.mean(vals), statistics.stdev(vals)
            for i in rows:
                for t in range(T):
                    want = sum((float(rewards[i, u]) - mu) / ((sd + 1e-4) if scale else 1.0)
                               for u in range(t, lengths[i]))
                    assert float(got[i, t]) == pytest.approx(want, abs=1e-9)
    # the first position carries the sequence score minus the group's mean reward per token times the length
    seq = group_token_advantages(rewards, mask, G)[:, 0]
    first = [float(rewards[i, :lengths[i]].sum()) for i in range(3)]
    mu0 = sum(first) / sum(lengths[:3])
    assert seq[:3].tolist() == pytest.approx([s - mu0 * n for s, n in zip(first, lengths[:3], strict=True)])
    # a tied group carries no signal; bad shapes are refused
    flat = group_token_advantages(torch.ones(2, 3), torch.ones(2, 3), 2, scale_by_std=True)
    assert flat.abs().max() == 0
    with pytest.raises(ValueError, match="multiple"):
        group_token_advantages(rewards[:5], mask[:5], G)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, mask) == pytest.approx(0.0)
    # residuals [1, 0, -1] about mean 0: var 2/3; var(returns) = 2/3 -> 0
    assert explained_variance(torch.tensor([[0.0, 2.0, 4.0, 0.0]]), ret, mask) == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, torch.ones_like(ret), mask))
