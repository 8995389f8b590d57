"""``reward.extra_train_paths`` in the reward recipe (issue 15): the extra pairs are trained on
together with ``train_path``, never evaluated on, and a bad extra row fails naming its file and row."""

from __future__ import annotations

import pytest

from alignment.config import RewardConfig
from alignment.recipes.reward import RewardRecipe
from tests.tiny_models import make_tiny_model, preference_pairs

pytestmark = pytest.mark.slow


def _train(tmp_path, name: str, model, extra: list[str]) -> tuple[dict, dict]:
    cfg = RewardConfig(model={"name_or_path": str(model)}, output_dir=str(tmp_path / name), batch_size=8,
                       max_steps=30, optim={"lr": 3e-3, "schedule": "constant"}, max_length=64, max_prompt_length=32,
                       train_path=str(tmp_path / "train.parquet"), eval_path=str(tmp_path / "eval.parquet"),
                       pooling="sum", extra_train_paths=extra)
    recipe = RewardRecipe(cfg)
    try:
        recipe.setup()
        assert recipe.train()
        return recipe.last_eval, recipe.data_stats
    finally:
        recipe.cleanup()


def test_the_reward_model_learns_from_the_extra_pairs_and_is_evaluated_without_them(tmp_path):
    model = make_tiny_model(tmp_path / "llama", "llama")
    preference_pairs(16, seed=0).to_parquet(tmp_path / "train.parquet")
    preference_pairs(32, seed=1).to_parquet(tmp_path / "eval.parquet")
    flipped = preference_pairs(64, seed=2)
    flipped[["chosen", "rejected"]] = flipped[["rejected", "chosen"]].to_numpy()  # a backlog that says the opposite
    flipped[:40].to_parquet(tmp_path / "flipped-a.parquet")
    flipped[40:].to_parquet(tmp_path / "flipped-b.parquet")
    alone, alone_data = _train(tmp_path, "alone", model, [])
    mixed, mixed_data = _train(tmp_path, "mixed", model, [str(tmp_path / "flipped-a.parquet"),
                                                          str(tmp_path / "flipped-b.parquet")])
    assert alone_data["train"]["examples"] == 16 and mixed_data["train"]["examples"] == 16 + 64
    # each extra file keeps its own data-stats entry
    assert mixed_data["train_extra_0"]["examples"] == 40 and mixed_data["train_extra_1"]["examples"] == 24
    assert alone_data["eval"]["examples"] == mixed_data["eval"]["examples"] == 32  # eval: the round's pairs only
    # 4 in 5 training rows now prefer BAD words: the model turns around on the same eval pairs
    assert alone["eval/accuracy"] >= 0.9 and mixed["eval/accuracy"] <= 0.2, (alone, mixed)


def test_a_bad_extra_row_names_its_file_and_row(tmp_path):
    model = make_tiny_model(tmp_path / "gpt2", "gpt2")
    preference_pairs(8, seed=0).to_parquet(tmp_path / "train.parquet")
    bad = preference_pairs(8, seed=3)
    bad.loc[5, "chosen"] = ""
    bad.to_parquet(tmp_path / "bad.parquet")
    cfg = RewardConfig(model={"name_or_path": str(model)}, output_dir=str(tmp_path / "run"), batch_size=4, max_steps=2,
                       train_path=str(tmp_path / "train.parquet"), extra_train_paths=[str(tmp_path / "bad.parquet")])
    recipe = RewardRecipe(cfg)
    try:
        with pytest.raises(ValueError, match=r"bad.parquet row 5: column 'chosen' must be a non-empty string"):
            recipe.setup()
    finally:
        recipe.cleanup()
