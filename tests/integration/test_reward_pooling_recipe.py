"""The reward recipe with ``pooling: sum`` (issue 15) trains on a tiny model, and its folder scores
as it trained: the pooling travels in ``config.json`` to every scorer; ``calibrate`` folds the eval
pairs' temperature into the head."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.config import ConfigError, RewardConfig
from alignment.models import ScalarReward, load_reward_model, load_tokenizer, score_responses
from alignment.recipes.reward import RewardRecipe
from tests.recipe_runs import train_between_evaluations
from tests.tiny_models import make_tiny_model, preference_pairs, ranked_pairs

pytestmark = pytest.mark.slow


def test_sum_pooled_reward_model_learns_and_its_folder_keeps_the_pooling(tmp_path):
    model = make_tiny_model(tmp_path / "llama", "llama")
    preference_pairs(64, seed=0, chat_every=4).to_parquet(tmp_path / "train.parquet")
    preference_pairs(32, seed=1).to_parquet(tmp_path / "eval.parquet")
    cfg = RewardConfig(model={"name_or_path": str(model)}, output_dir=str(tmp_path / "run"), batch_size=8,
                       max_steps=30, optim={"lr": 3e-3, "schedule": "constant"}, max_length=64, max_prompt_length=32,
                       train_path=str(tmp_path / "train.parquet"), eval_path=str(tmp_path / "eval.parquet"),
                       pooling="sum", packing=True, share_prompt=True)
    before, after = train_between_evaluations(RewardRecipe(cfg))
    assert before["eval/accuracy"] < 0.8 and after["eval/accuracy"] >= 0.9, (before, after)
    assert after["eval/loss"] < 0.5 * before["eval/loss"], (before, after)
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "config.json").read_text())
    assert saved["reward_pooling"] == "sum"
    assert (saved["reward_max_length"], saved["reward_max_prompt_length"]) == (cfg.max_length, cfg.max_prompt_length)
    settings = cfg.model.model_copy(update={"name_or_path": str(final)})
    tok = load_tokenizer(settings)
    scorer = load_reward_model(settings, tok, trainable=False)
    assert ScalarReward(scorer).pooling == "sum"
    good, bad = score_responses(scorer, tok, ["review the movie"] * 2, ["it was good great happy", "it was bad awful sad"])
    assert good > bad + 1.0


def test_calibrate_folds_the_eval_temperature_into_the_head(tmp_path):
    from alignment.recipes.reward import fit_temperature

    model = make_tiny_model(tmp_path / "gpt2", "gpt2")
    preference_pairs(64, seed=0).to_parquet(tmp_path / "train.parquet")
    noisy = preference_pairs(32, seed=1)
    flip = noisy.index % 4 == 0  # a quarter of the eval labels flipped: no perfect separation
    noisy.loc[flip, ["chosen", "rejected"]] = noisy.loc[flip, ["rejected", "chosen"]].to_numpy()
    noisy.to_parquet(tmp_path / "eval.parquet")
    cfg = RewardConfig(model={"name_or_path": str(model)}, output_dir=str(tmp_path / "run"), batch_size=8,
                       max_steps=20, optim={"lr": 3e-3, "schedule": "constant"}, max_length=64, max_prompt_length=32,
                       train_path=str(tmp_path / "train.parquet"), eval_path=str(tmp_path / "eval.parquet"),
                       pooling="sum", calibrate=True)
    summary = RewardRecipe(cfg).run()
    temperature = summary["reward_temperature"]
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["reward_temperature"] == temperature
    assert temperature > 1.0  # a quarter of flipped labels: the trained model is over-confident on them
    settings = cfg.model.model_copy(update={"name_or_path": str(final)})
    tok = load_tokenizer(settings)
    scorer = load_reward_model(settings, tok, trainable=False)
    prompts = noisy["prompt"].tolist()
    margins = [c - r for c, r in zip(score_responses(scorer, tok, prompts, noisy["chosen"].tolist()),
                                     score_responses(scorer, tok, prompts, noisy["rejected"].tolist()), strict=True)]
    assert fit_temperature(torch.tensor(margins)) == pytest.approx(1.0, rel=1e-3)  # calibrated: nothing left to fit


def test_a_reward_model_with_response_groups_learns_from_rankings_running_each_response_once(tmp_path):
    model = make_tiny_model(tmp_path / "llama", "llama")
    ranked_pairs(24, 4, seed=0).to_parquet(tmp_path / "train.parquet")  # 144 pairs, 96 distinct responses
    ranked_pairs(8, 4, seed=1).to_parquet(tmp_path / "eval.parquet")
    cfg = RewardConfig(model={"name_or_path": str(model)}, output_dir=str(tmp_path / "run"), batch_size=12,
                       max_steps=30, optim={"lr": 3e-3, "schedule": "constant"}, max_length=64, max_prompt_length=32,
                       train_path=str(tmp_path / "train.parquet"), eval_path=str(tmp_path / "eval.parquet"),
                       pooling="sum", packing=True, share_prompt=True, share_responses=True)
    seen = {}

    def inspect(recipe):
        batches = [recipe.feed.data.collate([recipe.feed.data[i] for i in b]) for b in recipe.feed.sampler.epoch_batches(0)]
        seen["sequences"] = sum(b["num_sequences"] for b in batches)
        seen["pairs"] = sum(len(b["pair_chosen"]) for b in batches)

    before, after = train_between_evaluations(RewardRecipe(cfg), inspect)
    # A prompt's 6 pairs mostly share a batch: about 4 responses run for them, not 12.
    assert seen["sequences"] < 0.9 * seen["pairs"], seen
    assert before["eval/accuracy"] < 0.8 and after["eval/accuracy"] >= 0.85, (before, after)
    assert after["eval/loss"] < 0.6 * before["eval/loss"], (before, after)


def test_response_groups_without_a_shared_prompt_are_refused_at_set_up(tmp_path):
    model = make_tiny_model(tmp_path / "gpt2", "gpt2")
    ranked_pairs(4, 3, seed=0).to_parquet(tmp_path / "train.parquet")
    cfg = RewardConfig(model={"name_or_path": str(model)}, output_dir=str(tmp_path / "run"), batch_size=4, max_steps=1,
                       train_path=str(tmp_path / "train.parquet"), share_responses=True)
    recipe = RewardRecipe(cfg)
    try:
        with pytest.raises(ConfigError, match="share_responses.*set share_prompt"):
            recipe.setup()
    finally:
        recipe.cleanup()
