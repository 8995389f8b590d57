"""The KTO recipe trains for real on a tiny model from unpaired thumbs-style rows."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from alignment.batching import Truncation
from alignment.config import KTOConfig, ModelSettings
from alignment.models import load_tokenizer
from alignment.recipes import get_recipe
from alignment.recipes.kto import (
    KTORecipe,
    collate_unpaired,
    mismatched,
    mismatched_partners,
    tokenize_unpaired,
)
from tests.recipe_runs import train_between_evaluations
from tests.tiny_models import make_tiny_model, preference_pairs

pytestmark = pytest.mark.slow


def unpaired(n: int, seed: int) -> pd.DataFrame:
    """Each prompt once: even rows keep the GOOD-word response (desirable), odd rows the BAD one."""
    pairs = preference_pairs(n, seed=seed, chat_every=5)
    rows = [{"prompt": r.prompt, "is_chat": r.is_chat, "completion": r.chosen if i % 2 == 0 else r.rejected,
             "label": i % 2 == 0, "weight": 1.0, "split": "train"} for i, r in enumerate(pairs.itertuples())]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto")
    paths = {"model": make_tiny_model(root / "gpt2", "gpt2")}
    for name, frame in {"train": unpaired(96, 0), "eval": unpaired(48, 1)}.items():
        paths[name] = root / f"{name}.parquet"
        frame.to_parquet(paths[name])
    return paths


def config(data, tmp_path, **overrides) -> KTOConfig:
    base = {"model": {"name_or_path": str(data["model"])}, "output_dir": str(tmp_path / "run"),
            "train_path": str(data["train"]), "eval_path": str(data["eval"]), "batch_size": 8, "max_steps": 30,
            "beta": 0.5, "optim": {"lr": 3e-3, "schedule": "constant"}, "max_length": 64, "max_prompt_length": 32}
    return KTOConfig(**{**base, **overrides})


def test_mismatched_partners_take_another_prompt_and_are_seeded():
    keys = ["a", "a", "b", "c", "c", "c", "d"]
    partners = mismatched_partners(keys, seed=3)
    assert all(keys[j] != keys[i] for i, j in enumerate(partners))
    assert partners == mismatched_partners(keys, seed=3) != mismatched_partners(keys, seed=4)
    assert mismatched_partners(["only"], seed=0) == [0] and mismatched_partners(["x", "x"], seed=0) == [0, 1]


def test_tokenized_examples_carry_a_partner_completion_and_bad_labels_name_the_row(data):
    tok = load_tokenizer(ModelSettings(name_or_path=str(data["model"])))
    rows = unpaired(12, 2).to_dict("records")
    examples, stats = tokenize_unpaired(tok, rows, Truncation(64, 32), seed=0, source="u.parquet")
    assert stats["desirable"] == 6 and stats["undesirable"] == 6 and len(examples) == 12
    completions = {tuple(e["completion"]) for e in examples}
    for e in examples:
        assert tuple(e["kl_completion"]) in completions and e["kl_completion"] != e["completion"]
    batch = collate_unpaired(examples[:4], pad_id=tok.pad_token_id)
    assert batch["label"].tolist() == [e["label"] for e in examples[:4]]
    assert mismatched(batch)["num_sequences"] == 4 and batch["num_sequences"] == 4
    rows[5]["label"] = "yes"
    with pytest.raises(ValueError, match="u.parquet row 5: column 'label'"):
        tokenize_unpaired(tok, rows, Truncation(64, 32), source="u.parquet")


def test_kto_learns_desirable_vs_undesirable_from_unpaired_rows(data, tmp_path):
    assert get_recipe("kto") is KTORecipe
    before, after = train_between_evaluations(KTORecipe(config(data, tmp_path)))
    # held-out prompts: the implied reward now separates GOOD-word from BAD-word responses
    assert before["eval/rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    assert after["eval/rewards/accuracy"] >= 0.85, after
    assert after["eval/rewards/chosen"] > 0 > after["eval/rewards/rejected"]
    assert after["eval/loss"] < before["eval/loss"] - 0.1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["phase"] == "train"]
    assert len(train) == 30 and all(r["kl"] >= 0 for r in train)
    assert any(r["kl"] > 0 for r in train)  # the policy drifts, and the estimate sees it
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_precomputed_reference_equals_a_frozen_copy_and_is_cached(data, tmp_path):
    cache = str(tmp_path / "refcache")
    losses = {}
    for name, reference in (("precomputed", "precomputed"), ("copy", "copy"), ("again", "precomputed")):
        recipe = KTORecipe(config(data, tmp_path / name, reference=reference, ref_cache_dir=cache, max_steps=2))
        try:
            recipe.setup()
            losses[name] = recipe.evaluate()["eval/loss"]
            assert recipe.train()
            losses[name + "/trained"] = recipe.last_eval["eval/loss"]
        finally:
            recipe.cleanup()
        if name == "again":
            assert recipe.reference_forwards == 0 and recipe.reference_cache_hits == ["train", "eval"]
    assert losses["precomputed"] == pytest.approx(losses["copy"], abs=1e-5)
    assert losses["precomputed/trained"] == pytest.approx(losses["copy/trained"], abs=1e-4)
    assert losses["again/trained"] == pytest.approx(losses["precomputed/trained"], abs=1e-6)


def test_without_the_kl_estimate_the_reference_point_is_zero(data, tmp_path):
    recipe = KTORecipe(config(data, tmp_path, kl_estimate=False, max_steps=3, reference="copy"))
    try:
        recipe.setup()
        batch = recipe.eval_set.collate(recipe.eval_set.examples[:4])
        assert "kl.input_ids" not in batch
        with torch.no_grad():
            out = recipe.compute_loss(batch)
        assert float(out.metrics["kl"]) == 0.0
        assert recipe.train()
    finally:
        recipe.cleanup()


def test_packed_batches_give_the_padded_losses(data, tmp_path):
    runs = {}
    for packing in (False, True):
        recipe = KTORecipe(config(data, tmp_path / str(packing), packing=packing, max_steps=2, reference="copy"))
        try:
            recipe.setup()
            assert recipe.packing is packing
            before = recipe.evaluate()
            assert recipe.train()
            runs[packing] = (before, recipe.last_eval)
        finally:
            recipe.cleanup()
    for key in ("eval/logps/chosen", "eval/logps/rejected", "eval/loss"):  # the same numbers before training
        assert runs[True][0][key] == pytest.approx(runs[False][0][key], abs=1e-4), key
    # and the same run (two Adam steps amplify summation-order noise a little)
    assert runs[True][1]["eval/loss"] == pytest.approx(runs[False][1]["eval/loss"], abs=2e-3)
