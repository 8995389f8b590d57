"""``demo.offline`` (issue 15): one tiny demo round builds the offline preference set and trains the
offline reward model once (cached), the round's reward model starts from it and fine-tunes on the
round's pairs (DPO never sees the set), the judge's held-out figures stay on the round's own
validation pairs, and the reward run and registered version record the set's size and digest."""

from __future__ import annotations

import pandas as pd
import pytest

from flows.pipeline import alignment_pipeline
from tasks.config import load_pipeline_config
from tasks.stages.demo import demo_base_model, demo_offline_reward_model
from tests.integration.pipeline_helpers import TINY, child_runs, overrides, use_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_demo_reward_model_starts_from_the_offline_reward_model_and_records_it(prefect_harness, demo_cache,
                                                                              tmp_path, clean_mlflow_env):
    home = tmp_path / "home"
    sets = overrides(home, demo_cache, "demo.offline.enabled=true", "demo.offline.max_prompts=150")
    summary = alignment_pipeline(config=TINY, overrides=sets)
    assert summary["status"] in ("promoted", "not-promoted"), summary
    client = use_store(home)
    children = child_runs(client, summary["mlflow_run_id"])
    reward, dpo = children["reward"][0], children["dpo"][0]
    (offline_file,) = demo_cache.glob("offline-*/pairs-train.parquet")
    offline = pd.read_parquet(offline_file)
    assert len(offline) > 100 and set(offline["split"]) == {"train"}
    params = reward.data.params
    assert params["warm_start.pairs"] == str(len(offline))
    assert "reward-offline-" in params["model.name_or_path"] == params["warm_start.model"]
    # the judge's held-out pairs are the round's own validation pairs, none of them offline
    assert params["eval_path"].endswith("pairs-validation.parquet")
    assert not set(pd.read_parquet(params["eval_path"])["prompt"]) & set(offline["prompt"])
    assert not set(pd.read_parquet(params["train_path"])["pair_id"]) & set(offline["pair_id"])
    assert "warm_start.pairs" not in dpo.data.params and dpo.data.params["train_path"] == params["train_path"]
    version = client.get_model_version("tiny-reward", "1")
    assert version.tags["alignflow.reward.warm_start_pairs"] == str(len(offline))
    assert version.tags["alignflow.reward.warm_start_digest"] == params["warm_start.digest"]
    # trained once: the next call (the next round, or another home on the same cache) reads it back
    cfg = load_pipeline_config(TINY, sets)
    again = demo_offline_reward_model(cfg, demo_base_model(cfg))
    assert again.summary["cached"] and again.path == params["model.name_or_path"]
