"""A stage's cache entry belongs to one pipeline in one home (issue 14): pipeline B must not be
handed pipeline A's reward-model record (whose run folder is under A's name), nor a home the
records of another home that shares the Prefect result storage."""

from __future__ import annotations

from tasks.config import load_pipeline_config
from tasks.records import ModelRecord
from tasks.stages.train import train_task
from tests.integration.pipeline_helpers import TINY


def test_training_cache_keys_differ_by_pipeline_name_and_home(tmp_path):
    def cfg(name, home):
        return load_pipeline_config(TINY, [f"pipeline.name={name}", f"pipeline.home={tmp_path / home}"])

    base = ModelRecord(stage="base", path=str(tmp_path / "base"), digest="b" * 16, base=str(tmp_path / "base"))
    key_fn = train_task.cache_policy.cache_key_fn

    def key(c):
        inputs = {"cfg": c, "stage": "reward", "data": {"pairs-train": str(tmp_path / "pairs-train.parquet")},
                  "dataset_digest": "d" * 16, "init": base, "parent_run_id": None}
        return key_fn(None, inputs)

    a, b, elsewhere = key(cfg("alpha", "home")), key(cfg("beta", "home")), key(cfg("alpha", "other"))
    assert a == key(cfg("alpha", "home"))  # deterministic: a re-run hits its own cache
    assert len({a, b, elsewhere}) == 3
