"""Losses against hand computations written out with python floats and ``math``."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.losses import (
    dpo_loss,
    entropy_from_logits,
    ppo_policy_loss,
    ppo_value_loss,
    reward_loss,
    simpo_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


PC, PR, RC, RR = [-10.0, -4.0, -7.5], [-12.0, -3.0, -7.0], [-11.0, -4.5, -6.0], [-11.5, -3.5, -8.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_matches_hand_computation(loss_type, smoothing):
    if smoothing and loss_type != "sigmoid":
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
        return
    beta = 0.5
    losses, rc, rr = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    for i in range(3):
        h = (PC[i] - PR[i]) - (RC[i] - RR[i])
        if loss_type == "sigmoid":
            want = -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
        elif loss_type == "ipo":
            want = (h - 1 / (2 * beta)) ** 2
        else:
            want = max(0.0, 1 - beta * h)
        assert losses[i].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert rc[i].item() == pytest.approx(beta * (PC[i] - RC[i]))
        assert rr[i].item() == pytest.approx(beta * (PR[i] - RR[i]))


def test_dpo_specific_values_and_detached_rewards():
    # h = (-1 - -2) - (0 - 0) = 1, beta = 1: loss = log(1 + e^-1) = 0.31326168751822286
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, rc, _ = dpo_loss(pc, torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=1.0)
    assert losses.item() == pytest.approx(0.31326168751822286, rel=1e-6)
    assert not rc.requires_grad
    losses.sum().backward()
    # d/dh -log sigma(h) = -(1 - sigma(h)) = -sigma(-1) = -0.2689414213699951
    assert pc.grad.item() == pytest.approx(-0.2689414213699951, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pc, pc, pc, beta=1.0, loss_type="nope")


def test_simpo_loss_matches_hand_computation():
    beta, gamma, eps = 2.0, 0.5, 0.1
    chosen, rejected = [-1.2, -0.5], [-1.0, -2.0]  # already length-normalised
    losses, rc, rr = simpo_loss(t(chosen), t(rejected), beta=beta, gamma=gamma, label_smoothing=eps)
    for i in range(2):
        z = beta * (chosen[i] - rejected[i]) - gamma
        assert losses[i].item() == pytest.approx(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), rel=1e-12)
        assert rc[i].item() == pytest.approx(beta * chosen[i])
        assert rr[i].item() == pytest.approx(beta * rejected[i])


def test_reward_loss_margin_and_centering():
    c, r, m = [1.0, -0.5, 2.0], [0.0, 0.5, 2.5], [0.5, 0.0, 1.0]
    plain = reward_loss(t(c), t(r))
    with_margin = reward_loss(t(c), t(r), margin=t(m), center_coef=0.01)
    for i in range(3):
        assert plain[i].item() == pytest.approx(-log_sigmoid(c[i] - r[i]), rel=1e-12)
        want = -log_sigmoid(c[i] - r[i] - m[i]) + 0.01 * (c[i] + r[i]) ** 2
        assert with_margin[i].item() == pytest.approx(want, rel=1e-12)


def test_ppo_policy_loss_hand_computation():
    lp = [[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]]
    old = [[-1.3, -1.9, -0.5], [-1.0, -0.5, -3.0]]
    adv = [[1.0, -2.0, 0.5], [0.7, 1.5, 9.0]]
    mask = [[1, 1, 1], [1, 1, 0]]
    eps = 0.2
    loss, stats = ppo_policy_loss(t(lp), t(old), t(adv), torch.tensor(mask), clip_range=eps)
    terms, clipped, kls = [], [], []
    for b in range(2):
        for i in range(3):
            if not mask[b][i]:
                continue
            ratio = math.exp(lp[b][i] - old[b][i])
            a = adv[b][i]
            un, cl = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            terms.append(max(un, cl))
            clipped.append(1.0 if cl > un else 0.0)
            kls.append((ratio - 1) - math.log(ratio))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped))
    assert stats["approx_kl"].item() == pytest.approx(sum(kls) / len(kls), rel=1e-12)
    assert 0 < stats["clipfrac"].item() < 1  # the fixture exercises both branches


def test_ppo_value_loss_hand_computation():
    v = [[0.5, 1.0], [2.0, -1.0]]
    old = [[0.0, 1.1], [1.0, 0.0]]
    ret = [[1.0, 0.0], [0.0, 5.0]]
    mask = [[1, 1], [1, 0]]
    eps = 0.2
    loss, stats = ppo_value_loss(t(v), t(old), t(ret), torch.tensor(mask), clip_range=eps)
    errs, clipped = [], []
    for b in range(2):
        for i in range(2):
            if not mask[b][i]:
                continue
            vc = old[b][i] + min(max(v[b][i] - old[b][i], -eps), eps)
            e1, e2 = (v[b][i] - ret[b][i]) ** 2, (vc - ret[b][i]) ** 2
            errs.append(max(e1, e2))
            clipped.append(1.0 if e2 > e1 else 0.0)
    assert loss.item() == pytest.approx(0.5 * sum(errs) / len(errs), rel=1e-12)
    assert stats["vf_clipfrac"].item() == pytest.approx(sum(clipped) / len(clipped))


def test_entropy_hand_and_chunked():
    logits = [[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]]
    ent = entropy_from_logits(t(logits))
    assert ent[0].item() == pytest.approx(math.log(4), rel=1e-12)
    z = sum(math.exp(x) for x in logits[1])
    want = -sum(math.exp(x) / z * (x - math.log(z)) for x in logits[1])
    assert ent[1].item() == pytest.approx(want, rel=1e-12)
    big = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    full = entropy_from_logits(big, chunk_size=None)
    chunked = entropy_from_logits(big, chunk_size=4)  # 21 positions: chunks of 4 with a remainder
    torch.testing.assert_close(full, chunked)
    (g_full,) = torch.autograd.grad(full.sum(), big)
    (g_chunk,) = torch.autograd.grad(chunked.sum(), big)
    torch.testing.assert_close(g_full, g_chunk)


def test_gradcheck_losses():
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    pc, pr, rc, rr = rnd(4), rnd(4), rnd(4), rnd(4)
    for lt in ("sigmoid", "ipo"):
        assert torch.autograd.gradcheck(
            lambda a, b, c, d, lt=lt: dpo_loss(a, b, c, d, beta=0.3, loss_type=lt, label_smoothing=0.0)[0],
            (pc, pr, rc, rr),
        )
    assert torch.autograd.gradcheck(lambda a, b: simpo_loss(a, b, beta=2.0, gamma=0.3, label_smoothing=0.1)[0], (pc, pr))
    assert torch.autograd.gradcheck(lambda a, b: reward_loss(a, b, center_coef=0.1), (pc, pr))
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    old, adv = torch.randn(2, 3, generator=gen, dtype=torch.float64), torch.randn(2, 3, generator=gen, dtype=torch.float64)
    # Small ratios stay inside the clip region, away from the kinks of max/clamp.
    lp = (old + 0.01 * torch.randn(2, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ppo_policy_loss(x, old, adv, mask, 0.2)[0], (lp,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, chunk_size=2), (rnd(5, 6),))
