"""RPO's NLL term (alignment.losses.chosen_nll) and its place in the DPO config."""

from __future__ import annotations

import pytest
import torch

from alignment.config import DPOConfig
from alignment.losses import chosen_nll


def test_chosen_nll_is_the_per_token_negative_log_likelihood():
    logps = torch.tensor([-6.0, -2.0, -3.0])
    tokens = torch.tensor([3.0, 4.0, 0.0])  # an empty response counts as one token, never divides by 0
    assert torch.allclose(chosen_nll(logps, tokens), torch.tensor([2.0, 0.5, 3.0]))


def test_chosen_nll_gradient_raises_the_chosen_log_prob():
    logps = torch.tensor([-6.0], requires_grad=True)
    chosen_nll(logps, torch.tensor([3.0])).sum().backward()
    assert logps.grad.item() == pytest.approx(-1 / 3)  # descending the loss raises log π(y_w)


def test_nll_coef_defaults_off_and_is_non_negative():
    assert DPOConfig().nll_coef == 0.0
    with pytest.raises(ValueError):
        DPOConfig(nll_coef=-0.1)
