"""The method table: every row points at a real config section and recipe, and the pipeline
config accepts exactly the table's methods."""

from __future__ import annotations

import pytest

from alignment.config import RECIPE_CONFIGS
from alignment.recipes import RECIPES
from tasks.config import PipelineConfig, load_pipeline_config
from tasks.methods import METHOD_NAMES, STAGES, method
from tasks.records import ModelRecord
from tasks.stages.train import recipe_settings


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_row_names_a_section_and_a_recipe(name):
    row = STAGES[name]
    assert row.section in PipelineConfig.model_fields
    assert row.recipe in RECIPE_CONFIGS and row.recipe in RECIPES
    assert isinstance(getattr(PipelineConfig(), row.section), RECIPE_CONFIGS[row.recipe])


def test_pipeline_method_accepts_exactly_the_table_methods():
    for name in METHOD_NAMES:
        assert load_pipeline_config(None, [f"pipeline.method={name}"]).pipeline.method == name
    with pytest.raises(Exception, match="pipeline.method"):
        load_pipeline_config(None, ["pipeline.method=sft"])  # a stage, not a method
    with pytest.raises(KeyError, match="unknown training stage"):
        method("kto-not-yet")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_recipe_settings_follow_the_row(tmp_path, name):
    row = STAGES[name]
    data = {f"{role}-train": str(tmp_path / f"{role}.parquet") for role in ("pairs", "prompts", "demonstrations", "unpaired")}
    init = ModelRecord(stage="base", path=str(tmp_path / "base"), digest="b")
    reward = ModelRecord(stage="reward", path=str(tmp_path / "rm"), digest="r")
    cfg = load_pipeline_config(None, [f"pipeline.method={name}"])
    recipe, settings = recipe_settings(cfg, name, data, init, reward=reward)
    assert recipe == row.recipe and settings.train_path == data[f"{row.data}-train"]
    if row.loss_type is not None:
        assert settings.loss_type == row.loss_type
    if row.needs_reward_model:
        assert settings.reward_model == reward.path
        with pytest.raises(ValueError, match="needs a reward model"):
            recipe_settings(cfg, name, data, init)
    with pytest.raises(ValueError, match=f"{row.data}-train"):
        recipe_settings(cfg, name, {}, init, reward=reward)


def test_stage_seed_is_the_pipelines_unless_its_section_sets_one(tmp_path):
    """``pipeline.seed`` seeds every stage; ``--set ppo.seed=…`` moves that stage alone (it was
    silently overwritten by the pipeline's seed)."""
    data = {"prompts-train": str(tmp_path / "prompts.parquet"), "pairs-train": str(tmp_path / "pairs.parquet")}
    init = ModelRecord(stage="base", path=str(tmp_path / "base"), digest="b")
    reward = ModelRecord(stage="reward", path=str(tmp_path / "rm"), digest="r")
    cfg = load_pipeline_config(None, ["pipeline.seed=3", "ppo.seed=7"])
    assert recipe_settings(cfg, "ppo", data, init, reward=reward)[1].seed == 7
    assert recipe_settings(cfg, "dpo", data, init)[1].seed == 3
    assert recipe_settings(load_pipeline_config(None, ["pipeline.seed=3"]), "ppo", data, init, reward=reward)[1].seed == 3
