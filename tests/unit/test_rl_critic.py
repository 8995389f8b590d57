"""The critic's own learning rate (ppo.value_lr) and the RL helpers added for issue 15, point 5."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignment.config import OptimSettings
from alignment.recipes.optim import build_optimizer, build_scheduler


def _two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))


def test_own_lrs_get_their_own_groups_after_the_main_lr():
    model = _two_layers()
    critic = model[1]
    opt = OptimSettings(lr=1e-3, weight_decay=0.1, schedule="linear")
    optimizer = build_optimizer(model, opt, torch.device("cpu"), "test", {id(p): 5e-2 for p in critic.parameters()})
    groups = optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 5e-2, 5e-2]  # group 0 is still the logged main lr
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0]  # biases never decay
    assert {id(p) for g in groups[2:] for p in g["params"]} == {id(p) for p in critic.parameters()}
    # without overrides: the two groups as before
    plain = build_optimizer(_two_layers(), opt, torch.device("cpu"), "test")
    assert [g["lr"] for g in plain.param_groups] == [1e-3, 1e-3]


def test_own_lr_moves_its_parameters_by_its_own_step_and_follows_the_schedule():
    model = _two_layers()
    policy, critic = model
    opt = OptimSettings(lr=1e-3, schedule="linear", max_grad_norm=None)
    optimizer = build_optimizer(model, opt, torch.device("cpu"), "test", {id(p): 4e-2 for p in critic.parameters()})
    scheduler = build_scheduler(optimizer, opt, 4)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(8, 3)).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    # Adam's first step moves every parameter with a non-zero gradient by lr (m/sqrt(v) = ±1)
    steps = [(p.detach() - b).abs() for p, b in zip(model.parameters(), before, strict=True)]
    n_policy = len(list(policy.parameters()))
    for moved in steps[:n_policy]:
        assert moved[moved > 0].tolist() == pytest.approx([1e-3] * int((moved > 0).sum()), rel=1e-3)
    for moved in steps[n_policy:]:
        assert moved[moved > 0].tolist() == pytest.approx([4e-2] * int((moved > 0).sum()), rel=1e-3)
    # the linear schedule scales both peaks alike: 3/4 of each after one of four steps
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([7.5e-4, 7.5e-4, 3e-2, 3e-2])


def test_last_token_explained_variance_reads_each_rows_last_valid_token():
    import math
    import statistics

    from alignment.rl import last_token_explained_variance

    values = torch.tensor([[9.0, 1.0, 0.0], [5.0, 5.0, 2.5], [7.0, 0.0, 0.0], [3.0, 3.0, 3.0]])
    returns = torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, 2.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last row is empty: left out
    v, r = [1.0, 2.5, 7.0], [1.5, 2.0, -1.0]
    expected = 1 - statistics.pvariance([b - a for a, b in zip(v, r, strict=True)]) / statistics.pvariance(r)
    assert last_token_explained_variance(values, returns, mask) == pytest.approx(expected)
    # a critic that predicts every last return exactly explains all of it, whatever it says earlier
    knows_the_end = returns.clone()
    knows_the_end[:, 0] += 4.0  # wrong on first tokens (not the last of rows 0, 1)
    assert last_token_explained_variance(knows_the_end[:2], returns[:2], mask[:2]) == pytest.approx(1.0)
    assert math.isnan(last_token_explained_variance(values[:1], returns[:1], mask[:1]))


def test_a_detached_value_head_sends_no_gradient_into_the_policy(tmp_path):
    from alignment.batching import collate_sequences
    from alignment.config import ModelSettings
    from alignment.models import load_causal_lm
    from alignment.recipes.rollout import PolicyModule
    from tests.tiny_models import make_tiny_model

    policy = load_causal_lm(ModelSettings(name_or_path=str(make_tiny_model(tmp_path / "m", "gpt2"))))
    head = nn.Linear(policy.config.hidden_size, 1)
    module = PolicyModule(policy, chunk_size=64, temperature=0.7, value_head=head)
    batch = collate_sequences([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], pad_id=0)

    def grads(detach: bool) -> tuple[float, float]:
        module.zero_grad(set_to_none=True)
        module(batch, detach_value_input=detach)["values"].pow(2).sum().backward()
        trunk = sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None)
        return trunk, float(head.weight.grad.abs().sum())

    trunk, own = grads(detach=True)
    assert trunk == 0.0 and own > 0  # the head learns; the policy is untouched by the value loss
    trunk, own = grads(detach=False)
    assert trunk > 0 and own > 0  # shared: the value loss reaches the trunk
