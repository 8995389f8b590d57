"""Reward normalisation and sequence KL (alignment.rl) against plain-Python computations."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from alignment.rl import AdaptiveEntropyController, RunningMoments, normalize_scores, sequence_kl


def test_running_moments_equal_the_moments_of_everything_seen():
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, generator=gen) * 3 + 7 for n in (1, 5, 64, 2, 33)]
    moments = RunningMoments()
    seen: list[float] = []
    for batch in batches:
        moments.update(batch)
        seen += batch.tolist()
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(statistics.fmean(seen), abs=1e-6)
        assert moments.var == pytest.approx(statistics.pvariance(seen), rel=1e-6, abs=1e-9)
    assert moments.std == pytest.approx(statistics.pstdev(seen), rel=1e-6)


def test_running_moments_empty_batch_and_state_round_trip():
    moments = RunningMoments()
    assert (moments.count, moments.mean, moments.var) == (0, 0.0, 0.0)
    moments.update(torch.tensor([]))
    assert moments.count == 0
    moments.update(torch.tensor([1.0, 2.0, 4.0]))
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    restored.update(torch.tensor([8.0]))
    moments.update(torch.tensor([8.0]))
    assert restored.state_dict() == moments.state_dict()
    assert restored.mean == pytest.approx(15 / 4)
    assert restored.var == pytest.approx(statistics.pvariance([1.0, 2.0, 4.0, 8.0]))


def test_normalize_scores_by_hand():
    scores = torch.tensor([1.0, 3.0, -2.0])
    out = normalize_scores(scores, mean=0.5, std=2.0)
    assert out.tolist() == pytest.approx([(1 - 0.5) / 2, (3 - 0.5) / 2, (-2 - 0.5) / 2])
    # a constant batch whitened by its own moments is all zeros, never NaN
    flat = torch.full((4,), 2.5)
    assert normalize_scores(flat, float(flat.mean()), float(flat.std())).tolist() == [0.0] * 4


def test_sequence_kl_sums_the_estimator_over_valid_tokens():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -5.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    k1 = sequence_kl(logps, ref, mask, "k1")
    assert k1.tolist() == pytest.approx([0.5 - 1.0 + 0.0, -0.1 + 1.0])

    def k3(lp: float, rp: float) -> float:
        return math.exp(rp - lp) - 1 - (rp - lp)

    expected = [k3(-1.0, -1.5) + k3(-2.0, -1.0) + k3(-0.5, -0.5), k3(-0.3, -0.2) + k3(-4.0, -5.0)]
    assert sequence_kl(logps, ref, mask, "k3").tolist() == pytest.approx(expected)


def test_adaptive_entropy_controller_by_hand():
    ctl = AdaptiveEntropyController(0.0, target_ratio=0.8, delta=0.01, max_coef=0.025)
    # first entropy 3.0 sets the target 2.4; at or above it the coefficient stays at its floor 0
    assert ctl.update(3.0) == 0.0 and ctl.target == pytest.approx(2.4)
    values = [ctl.update(h) for h in (2.0, 2.0, 2.0, 2.5, 2.3)]
    assert values == pytest.approx([0.01, 0.02, 0.025, 0.015, 0.025])  # capped at max_coef, falls above target
    restored = AdaptiveEntropyController(0.0, target_ratio=0.8, delta=0.01, max_coef=0.025)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target) == (ctl.value, ctl.target)
    fixed = AdaptiveEntropyController(0.03)
    assert [fixed.update(h) for h in (3.0, 0.1)] == [0.03, 0.03]
    with pytest.raises(ValueError):
        AdaptiveEntropyController(0.0, target_ratio=1.5)
