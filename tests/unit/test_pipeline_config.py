"""Pipeline config: loading, overrides, digests."""

from __future__ import annotations

import pytest

from alignment.config import ConfigError, apply_overrides, parse_override
from tasks.config import DEMO_CONFIG, load_pipeline_config


def test_demo_config_loads_and_has_a_demo_section():
    cfg = load_pipeline_config()
    assert cfg.demo is not None and cfg.pipeline.name == "demo"
    assert DEMO_CONFIG.exists()


def test_overrides_parse_yaml_values_and_create_sections():
    assert parse_override("dpo.beta=0.25") == (["dpo", "beta"], 0.25)
    assert parse_override("gate.max_kl=null") == (["gate", "max_kl"], None)
    data = apply_overrides({}, ["a.b.c=[1, 2]", "a.d=text"])
    assert data == {"a": {"b": {"c": [1, 2]}, "d": "text"}}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")


def test_digest_ignores_home_and_schedule_but_not_training_settings(tmp_path):
    a = load_pipeline_config(None, [f"pipeline.home={tmp_path}/a"])
    b = load_pipeline_config(None, [f"pipeline.home={tmp_path}/b", "schedule.cron=5 4 * * *"])
    c = load_pipeline_config(None, ["dpo.beta=0.3"])
    assert a.digest() == b.digest() != c.digest()


def test_pipeline_name_must_be_a_slug():
    with pytest.raises(ConfigError, match="pipeline.name"):
        load_pipeline_config(None, ["pipeline.name=Bad Name"])


@pytest.mark.parametrize("name", ["demo.yaml", "tiny.yaml", "examples/qwen-lora-dpo.yaml",
                                  "examples/ppo-multi-gpu.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_pipeline_config(DEMO_CONFIG.parent / name)
    assert cfg.pipeline.method in ("dpo", "ipo", "simpo", "ppo", "grpo")


def test_dpo_reference_base_points_the_recipe_at_the_base_model(tmp_path):
    from tasks.records import ModelRecord
    from tasks.stages.train import recipe_settings

    data = {"pairs-train": str(tmp_path / "train.parquet")}
    base = ModelRecord(stage="base", path=str(tmp_path / "base"), digest="b")
    champion = ModelRecord(stage="champion", path=str(tmp_path / "champion"), digest="c")
    cfg = load_pipeline_config(None, ["pipeline.init_from=champion", "pipeline.dpo_reference=base"])
    _, anchored = recipe_settings(cfg, "dpo", data, champion, reference=base)
    assert anchored.model.name_or_path == str(tmp_path / "champion")
    assert anchored.reference_model.name_or_path == str(tmp_path / "base")
    assert anchored.reference_model.lora is None
    _, first_round = recipe_settings(cfg, "dpo", data, base, reference=base)  # no champion yet
    assert first_round.reference_model is None
    _, usual = recipe_settings(cfg, "dpo", data, champion)
    assert usual.reference_model is None
    with pytest.raises(Exception, match="dpo_reference"):
        load_pipeline_config(None, ["pipeline.dpo_reference=champion"])
