"""``--set pipeline.method=kto``: one tiny demo round trains KTO on the unpaired set under the real
Prefect engine and MLflow store, and registers the candidate."""

from __future__ import annotations

import pandas as pd
import pytest

from flows.pipeline import alignment_pipeline
from tests.integration.pipeline_helpers import TINY, child_runs, overrides, use_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_kto_method_trains_on_unpaired_feedback(prefect_harness, demo_cache, tmp_path, clean_mlflow_env):
    home = tmp_path / "home"
    summary = alignment_pipeline(config=TINY, overrides=overrides(home, demo_cache, "pipeline.method=kto",
                                                                  "reward.enabled=false"))
    assert summary["status"] in ("promoted", "not-promoted"), summary
    client = use_store(home)
    children = child_runs(client, summary["mlflow_run_id"])
    assert "kto" in children and "dpo" not in children and "reward" not in children
    kto = children["kto"][0]
    assert kto.data.params["beta"] == "0.1"
    assert kto.data.params["train_path"].endswith("unpaired-train.parquet")
    train = pd.read_parquet(kto.data.params["train_path"])
    assert len(train) >= 20 and train["label"].any() and (~train["label"]).any()
    loss = [m.value for m in sorted(client.get_metric_history(kto.info.run_id, "loss"), key=lambda m: m.step)]
    # the policy starts as its own reference: r = 0 and z0 = 0, so every example costs exactly 1/2
    assert loss[0] == pytest.approx(0.5, abs=1e-4)
    assert any(abs(v - 0.5) > 1e-4 for v in loss[1:]), loss
    # z0 = max(0, the KL estimate on mismatched pairs): the estimate starts at 0 (the policy is its reference) and
    # moves as the policy leaves it, either way (an estimate, not a KL: on some CPUs it stays negative here)
    kl = [m.value for m in sorted(client.get_metric_history(kto.info.run_id, "kl"), key=lambda m: m.step)]
    estimate = [m.value for m in sorted(client.get_metric_history(kto.info.run_id, "kl/estimate"), key=lambda m: m.step)]
    assert len(estimate) == len(kl) and abs(estimate[0]) < 1e-3 and abs(estimate[-1]) > 0.01, estimate
    assert kl == pytest.approx([max(0.0, v) for v in estimate], abs=1e-6), (kl, estimate)
    assert "rewards/accuracy" in kto.data.metrics and "final/eval/loss" in kto.data.metrics
    prefs = children["preferences"][0]
    assert prefs.data.metrics["data/unpaired"] == pytest.approx(
        prefs.data.metrics["data/unpaired_desirable"] + prefs.data.metrics["data/unpaired_undesirable"])
    version = client.get_model_version("tiny-policy", "1")
    assert version.tags["alignflow.method"] == "kto"
    # the version's description is its model card
    card = version.description
    assert card.startswith("**tiny-policy v1**") and "Method: kto" in card and "beta=0.1" in card
    assert f"digest `{version.tags['alignflow.data_digest']}`" in card and "Gate: " in card
