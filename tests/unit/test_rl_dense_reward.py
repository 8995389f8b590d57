"""Dense per-token rewards from a sum-pooled reward model, the lr floor and the applied reward
moments (issue 15, point 5), each against an independent computation."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import pytest
import torch

from alignment.batching import collate_sequences
from alignment.config import ModelSettings
from alignment.models import ScalarReward, hf_model, load_reward_model, load_tokenizer
from alignment.recipes.rollout import token_scores
from alignment.recipes.state import lr_lambda
from alignment.rl import kl_shaped_rewards, length_neutral_scores, scored_token_mask, token_rewards
from tests.tiny_models import make_tiny_model

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
RESPONSES = [[20, 21, 3], [22, 23, 24, 25], [26, 3]]  # rows 0 and 2 end with the EOS (id 3 in the tiny tokenizer)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def sum_reward_model(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    settings = ModelSettings(name_or_path=str(folder))
    model = load_reward_model(settings, load_tokenizer(settings), trainable=False)
    hf_model(model).config.reward_pooling = "sum"
    return model.eval()


def test_token_scores_are_the_heads_score_of_each_target_token_in_every_layout(sum_reward_model):
    inner = hf_model(sum_reward_model)
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES, strict=True):  # one sequence alone, plain loop
        hidden = inner.base_model(input_ids=torch.tensor([prompt + response])).last_hidden_state[0]
        expected += [float(inner.score(hidden[len(prompt) + j])[0]) for j in range(len(response))]
    for packing in (False, True):
        batch = collate_sequences(PROMPTS, RESPONSES, pad_id=0, packing=packing)
        with torch.no_grad():
            got = token_scores(sum_reward_model, batch)
        assert got.tolist() == pytest.approx(expected, abs=1e-5), packing


def test_token_scores_without_the_eos_sum_to_the_sum_pooled_score(sum_reward_model):
    eos = 3
    batch = collate_sequences(PROMPTS, RESPONSES, pad_id=0)
    without_eos = [r[:-1] if r[-1] == eos else r for r in RESPONSES]
    with torch.no_grad():
        flat = token_scores(sum_reward_model, batch)
        pooled = ScalarReward(sum_reward_model)(collate_sequences(PROMPTS, without_eos, pad_id=0))
    mask = torch.tensor([[1] * len(r) + [0] * (4 - len(r)) for r in RESPONSES])
    grid = torch.zeros(mask.shape)
    grid[mask.bool()] = flat
    scored = scored_token_mask(mask, torch.tensor([r[-1] == eos for r in RESPONSES]))
    assert (grid * scored).sum(1).tolist() == pytest.approx(pooled.tolist(), abs=1e-5)


def test_scored_token_mask_drops_only_a_final_eos():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    hit_eos = torch.tensor([True, False, True, True, False])
    assert scored_token_mask(mask, hit_eos).tolist() == [
        [1, 1, 0, 0],  # EOS at position 2 not scored
        [1, 1, 1, 1],  # cut by the length limit: every token scored
        [0, 0, 0, 0],  # a response that is only its EOS
        [0, 0, 0, 0],  # empty row stays empty
        [1, 1, 0, 0],
    ]
    assert mask.tolist()[0] == [1, 1, 1, 0]  # the input is left alone


def test_token_rewards_by_hand_and_their_row_sums():
    s = torch.tensor([[1.0, 3.0, 9.0], [-2.0, 0.5, 4.0]])
    scored = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r = token_rewards(s, scored, baseline=0.5, scale=2.0)
    assert r.flatten().tolist() == pytest.approx([0.25, 1.25, 0.0, -1.25, 0.0, 1.75])
    # a row sums to (S - baseline * L) / scale: length alone earns nothing at the mean token
    for row in range(2):
        tokens = [float(v) for v, m in zip(s[row], scored[row], strict=True) if m]
        assert float(r[row].sum()) == pytest.approx((sum(tokens) - 0.5 * len(tokens)) / 2.0)
    with pytest.raises(ValueError):
        token_rewards(s, scored, scale=0.0)


def test_length_neutral_scores_by_hand():
    scores, lengths = torch.tensor([6.0, 1.0, 5.0]), torch.tensor([4, 1, 5])
    out, b = length_neutral_scores(scores, lengths)
    assert b == pytest.approx(12 / 10)
    assert out.tolist() == pytest.approx([6 - 1.2 * 4, 1 - 1.2 * 1, 5 - 1.2 * 5])
    assert float(out.sum()) == pytest.approx(0.0, abs=1e-6)  # the rollout's average token earns nothing
    given, b = length_neutral_scores(scores, lengths, baseline=0.5)
    assert b == 0.5 and given.tolist() == pytest.approx([4.0, 0.5, 2.5])
    # the sum over a response of token_rewards at the same baseline
    s = torch.tensor([[2.0, 1.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    scored = (torch.arange(5)[None] < lengths[:, None]).long()
    assert token_rewards(s, scored, baseline=0.5).sum(1).tolist() == pytest.approx(given.tolist())
    with pytest.raises(ValueError):
        length_neutral_scores(scores, lengths[:2])


def test_kl_shaped_rewards_add_a_dense_grid_where_it_stands():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -5.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    dense = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 7.0]])
    rewards, kl = kl_shaped_rewards(dense, logps, ref, mask, kl_coef=0.5)
    k1 = [[0.5, -1.0, 0.0], [-0.1, 1.0, 0.0]]
    expected = [[dense[b, t].item() - 0.5 * k1[b][t] if mask[b, t] else 0.0 for t in range(3)] for b in range(2)]
    assert rewards.flatten().tolist() == pytest.approx([v for row in expected for v in row])
    assert kl.flatten().tolist() == pytest.approx([v for row in k1 for v in row])
    # a [B] score still goes to each row's last valid token only
    scalar, _ = kl_shaped_rewards(torch.tensor([2.0, 3.0]), logps, ref, mask, kl_coef=0.0)
    assert scalar.tolist() == [[0.0, 0.0, 2.0], [0.0, 3.0, 0.0]]
    with pytest.raises(ValueError, match="dense scores"):
        kl_shaped_rewards(dense[:, :2], logps, ref, mask, kl_coef=0.5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_lr_decays_to_its_floor_not_to_zero(schedule):
    import math

    factor = lr_lambda(warmup_steps=2, total_steps=12, schedule=schedule, min_ratio=0.1)
    values = [factor(s) for s in range(13)]
    assert values[:2] == pytest.approx([1 / 3, 2 / 3])  # warmup unchanged
    assert values[2] == pytest.approx(1.0) and values[12] == pytest.approx(0.1)  # the last step still moves
    for s in range(2, 13):
        p = (s - 2) / 10
        decay = 1 - p if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))
        assert values[s] == pytest.approx(0.1 + 0.9 * decay)
    assert lr_lambda(2, 12, schedule)(12) == pytest.approx(0.0)  # default: to 0, as before


def test_batch_normalisation_logs_the_moments_it_applied_across_processes():
    """reward_norm: batch with two processes: the moments applied (and logged) are the gathered
    batch's, not the local scores' (they were logged local while applied gathered)."""
    from alignment.recipes.grpo import GRPORecipe

    local, other = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    recipe = object.__new__(GRPORecipe)
    recipe.config = SimpleNamespace(reward_norm="batch")
    recipe.accelerator = SimpleNamespace(num_processes=2, gather=lambda x: torch.cat([x, other]))
    out = recipe.normalized(local)
    every = [1.0, 2.0, 3.0, 10.0, 20.0, 30.0]
    mean, std = statistics.fmean(every), statistics.stdev(every)
    assert recipe.norm_moments == pytest.approx((mean, std))
    assert out.tolist() == pytest.approx([(x - mean) / std for x in (1.0, 2.0, 3.0)])
    recipe.config = SimpleNamespace(reward_norm="none")
    assert recipe.normalized(local).tolist() == [1.0, 2.0, 3.0] and recipe.norm_moments == (0.0, 1.0)
