"""kto_loss against an independent plain-Python computation, and its gradient behaviour."""

from __future__ import annotations

import math
import random

import pytest
import torch

from alignment.losses import kto_loss


def reference_kto(pol, ref, labels, pol_kl, ref_kl, beta, wd, wu):
    """KTO written out with python floats: z0 = max(0, mean(pol_kl - ref_kl)); per example
    lambda_y * (1 - sigmoid(+-beta * (r - z0)))."""
    def sigmoid(x):
        return 1.0 / (1.0 + math.exp(-x))

    z0 = 0.0 if pol_kl is None else max(0.0, sum(p - q for p, q in zip(pol_kl, ref_kl, strict=True)) / len(pol_kl))
    losses, rewards = [], []
    for p, q, y in zip(pol, ref, labels, strict=True):
        r = p - q
        losses.append(wd * (1 - sigmoid(beta * (r - z0))) if y else wu * (1 - sigmoid(beta * (z0 - r))))
        rewards.append(beta * r)
    return losses, rewards, z0


def t(xs, grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_kl", [True, False])
def test_matches_plain_python(seed, with_kl):
    rnd = random.Random(seed)
    n = rnd.randint(1, 9)
    pol = [rnd.uniform(-40, -5) for _ in range(n)]
    ref = [p + rnd.uniform(-3, 3) for p in pol]
    labels = [rnd.random() < 0.5 for _ in range(n)]
    pol_kl = [rnd.uniform(-50, -10) for _ in range(n)] if with_kl else None
    ref_kl = [p + rnd.uniform(-4, 2) for p in pol_kl] if with_kl else None
    beta, wd, wu = rnd.uniform(0.05, 1.0), rnd.uniform(0.5, 2.0), rnd.uniform(0.5, 2.0)
    want_l, want_r, want_z = reference_kto(pol, ref, labels, pol_kl, ref_kl, beta, wd, wu)
    losses, rewards, kl = kto_loss(t(pol), t(ref), torch.tensor(labels), t(pol_kl) if with_kl else None,
                                   t(ref_kl) if with_kl else None, beta=beta, desirable_weight=wd,
                                   undesirable_weight=wu)
    assert losses.shape == (n,)
    assert losses.tolist() == pytest.approx(want_l, rel=1e-12, abs=1e-14)
    assert rewards.tolist() == pytest.approx(want_r, rel=1e-12)
    assert float(kl) == pytest.approx(want_z, abs=1e-12)


def test_reference_point_is_clamped_at_zero_and_detached():
    pol_kl, ref_kl = t([-10.0, -12.0], grad=True), t([-8.0, -9.0])  # mean log-ratio -2.5 < 0
    losses, _, kl = kto_loss(t([-5.0]), t([-5.0]), torch.tensor([True]), pol_kl, ref_kl, beta=0.5)
    assert float(kl) == 0.0
    assert losses.item() == pytest.approx(0.5)  # 1 - sigmoid(0)
    pol_kl2 = t([-6.0, -7.0], grad=True)  # mean log-ratio +2 > 0
    pol = t([-5.0, -5.0], grad=True)
    losses, _, kl = kto_loss(pol, t([-5.0, -5.0]), torch.tensor([True, False]), pol_kl2, ref_kl, beta=0.5)
    assert float(kl) == pytest.approx(2.0)
    assert not kl.requires_grad
    losses.sum().backward()
    assert pol_kl2.grad is None  # no gradient through the reference point
    assert pol.grad is not None


def test_gradient_raises_desirable_and_lowers_undesirable_logps():
    pol = t([-5.0, -5.0], grad=True)
    losses, _, _ = kto_loss(pol, t([-5.0, -5.0]), torch.tensor([True, False]), t([-9.0]), t([-9.5]), beta=0.1)
    losses.sum().backward()
    assert pol.grad[0] < 0 < pol.grad[1]  # descent raises log pi(desirable), lowers log pi(undesirable)


def test_class_weights_scale_only_their_class():
    args = (t([-5.0, -6.0]), t([-5.5, -5.0]), torch.tensor([True, False]))
    base, _, _ = kto_loss(*args, beta=0.2)
    scaled, _, _ = kto_loss(*args, beta=0.2, desirable_weight=3.0, undesirable_weight=0.5)
    assert scaled[0].item() == pytest.approx(3.0 * base[0].item())
    assert scaled[1].item() == pytest.approx(0.5 * base[1].item())


def test_loss_bounds_and_saturation():
    # a desirable response far above the reference point costs ~0, far below ~lambda_D
    losses, _, _ = kto_loss(t([0.0, -200.0]), t([-200.0, 0.0]), torch.tensor([True, True]), beta=1.0,
                            desirable_weight=2.0)
    assert losses[0].item() == pytest.approx(0.0, abs=1e-12)
    assert losses[1].item() == pytest.approx(2.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="both"):
        kto_loss(t([-1.0]), t([-1.0]), torch.tensor([True]), t([-1.0]), None, beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        kto_loss(t([-1.0, -2.0]), t([-1.0]), torch.tensor([True]), beta=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        kto_loss(t([-1.0]), t([-1.0]), torch.tensor([True]), t([]), t([]), beta=0.1)
