"""DPO with a drift budget stops early and keeps the last weights within budget (tiny model)."""

from __future__ import annotations

import json

import pytest

from alignment.budget import DriftProbe
from alignment.config import DPOConfig, GenerationSettings
from alignment.recipes.dpo import DPORecipe
from tests.tiny_models import make_tiny_model, preference_pairs

pytestmark = pytest.mark.slow


def test_kl_budget_stops_training_and_keeps_the_last_weights_within_it(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(tmp_path / "gpt2", "gpt2")
    pairs = tmp_path / "pairs.parquet"
    preference_pairs(64, seed=0).to_parquet(pairs)
    budget = {"max_kl": 0.5, "every": 2, "prompts": 16, "generation": {"max_new_tokens": 8, "temperature": 1.0}}
    cfg = DPOConfig(model={"name_or_path": str(model)}, output_dir=str(tmp_path / "run"), train_path=str(pairs),
                    batch_size=8, max_steps=40, optim={"lr": 3e-3, "schedule": "constant"}, max_length=64,
                    max_prompt_length=32, beta=0.1, budget=budget)
    recipe = DPORecipe(cfg)
    summary = recipe.run()
    stop = summary["budget"]["stop"]
    assert stop is not None and "past the budget" in stop["reason"], summary["budget"]
    assert summary["steps"] == stop["stopped_at"] < 40 and summary["finished"]
    readings = {r["step"]: r["kl"] for r in summary["budget"]["readings"]}
    assert readings[stop["stopped_at"]] > 0.5
    assert stop["kept_step"] == 0 or readings[stop["kept_step"]] <= 0.5
    # the saved model is the kept one: the same probe (same prompts and seed) reads it within budget
    probe = recipe.probe
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    again = probe.read(final, stop["kept_step"])
    assert again.kl == pytest.approx(readings.get(stop["kept_step"], 0.0), abs=1e-4)
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("budget/kl" in r for r in records)


def test_probe_of_the_reference_itself_reads_zero_kl(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_model(tmp_path / "m", "gpt2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    probe = DriftProbe(model, AutoTokenizer.from_pretrained(folder), ["review the movie", "tell me about it"], GenerationSettings(max_new_tokens=6), seed=0)
    r = probe.read(model, 0)
    assert r.kl == pytest.approx(0.0, abs=1e-6) and r.distinct2_ratio == pytest.approx(1.0)


def _first_step_metrics(tmp_path, **settings) -> dict:
    """Step 1's logged metrics of a one-step DPO run on a tiny GPT-2 (lr 1e-9: the batch and
    weights are those of any other such run)."""
    model = tmp_path / "gpt2"
    if not model.exists():
        make_tiny_model(model, "gpt2")
        preference_pairs(32, seed=0).to_parquet(tmp_path / "pairs.parquet")
    run = tmp_path / f"run-{len(list(tmp_path.glob('run-*')))}"
    cfg = DPOConfig(model={"name_or_path": str(model)}, output_dir=str(run), train_path=str(tmp_path / "pairs.parquet"),
                    batch_size=8, max_steps=1, optim={"lr": 1e-9}, max_length=64, max_prompt_length=32, **settings)
    DPORecipe(cfg).run()
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_nll_coef_adds_the_chosen_nll_to_the_dpo_loss(tmp_path):
    losses = {coef: _first_step_metrics(tmp_path, nll_coef=coef) for coef in (0.0, 1.0)}
    assert "nll/chosen" not in losses[0.0] and losses[1.0]["nll/chosen"] > 0
    # step 1 sees the same batch and weights: the loss differs by exactly the NLL term
    assert losses[1.0]["loss"] == pytest.approx(losses[0.0]["loss"] + losses[1.0]["nll/chosen"], rel=1e-4)


def test_entropy_coef_subtracts_the_mean_token_entropy_from_the_dpo_loss(tmp_path):
    first = {coef: _first_step_metrics(tmp_path, entropy_coef=coef, use_weights=False) for coef in (0.0, 0.5)}
    assert "entropy/chosen" not in first[0.0] and first[0.5]["entropy/chosen"] > 0
    # same batch and weights at step 1: the loss drops by α times the pairs' mean entropy over both sides
    mean_entropy = (first[0.5]["entropy/chosen"] + first[0.5]["entropy/rejected"]) / 2
    assert first[0.5]["loss"] == pytest.approx(first[0.0]["loss"] - 0.5 * mean_entropy, rel=1e-4)
