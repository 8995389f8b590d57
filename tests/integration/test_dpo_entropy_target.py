"""DPO's entropy term held to a target (``dpo.entropy_target``): the weight follows the measured
entropy step by step, and a resumed run goes on with the same weight and target (tiny GPT-2, real
recipe). What holding the entropy does to the demo's rounds is measured in RESULTS.md (issue 15)."""

from __future__ import annotations

import json

import pytest

from alignment.config import ConfigError, DPOConfig
from alignment.recipes.dpo import DPORecipe
from tests.tiny_models import make_tiny_model, preference_pairs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-entropy-target")
    model = make_tiny_model(root / "gpt2", "gpt2")
    preference_pairs(64, seed=0).to_parquet(root / "pairs.parquet")
    return {"root": root, "model": model}


def _config(assets, name: str, **settings) -> DPOConfig:
    base = dict(model={"name_or_path": str(assets["model"])}, output_dir=str(assets["root"] / name),
                train_path=str(assets["root"] / "pairs.parquet"), batch_size=8, max_steps=8,
                optim={"lr": 3e-3, "schedule": "constant"}, max_length=64, max_prompt_length=32, beta=0.1,
                use_weights=False)
    return DPOConfig(**{**base, **settings})


def _records(assets, name: str) -> list[dict]:
    lines = (assets["root"] / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "entropy/chosen" in r]


def _entropy(record: dict) -> float:
    return 0.5 * (record["entropy/chosen"] + record["entropy/rejected"])


def test_the_weight_follows_the_measured_entropy_toward_the_target(assets):
    DPORecipe(_config(assets, "held", entropy_coef=0.05, entropy_target=1.0, entropy_coef_step=0.02)).run()
    records = _records(assets, "held")
    assert len(records) == 8 and records[0]["entropy_coef"] == pytest.approx(0.05)
    target, coef = _entropy(records[0]), 0.05  # the first step's entropy, share 1.0
    for before, after in zip(records, records[1:], strict=False):
        coef = min(max(coef + (0.02 if _entropy(before) < target else -0.02), 0.0), 0.2)
        assert after["entropy_coef"] == pytest.approx(coef)
    assert len({round(r["entropy_coef"], 6) for r in records}) > 1  # it moved


def test_a_resumed_run_goes_on_with_the_same_weight_and_target(assets):
    settings = dict(entropy_coef=0.05, entropy_target=0.99, entropy_coef_step=0.02, save_every=3)
    DPORecipe(_config(assets, "whole", **settings)).run()
    DPORecipe(_config(assets, "resumed", **settings)).run(until_step=4)  # ends as if killed, after a checkpoint at step 4
    partial = _records(assets, "resumed")
    DPORecipe(_config(assets, "resumed", **settings)).run()
    whole, resumed = _records(assets, "whole"), _records(assets, "resumed")
    assert len(partial) >= 3 and [r["step"] for r in resumed] == [r["step"] for r in whole]
    for a, b in zip(whole, resumed, strict=True):
        assert b["entropy_coef"] == pytest.approx(a["entropy_coef"], abs=1e-9)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_a_starting_weight_above_the_cap_is_refused(assets):
    with pytest.raises(ConfigError, match="entropy_coef_max"):
        DPORecipe(_config(assets, "bad", entropy_coef=0.3, entropy_target=1.0, entropy_coef_max=0.2)).run()
