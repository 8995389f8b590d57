"""Simulated annotators: label rates match the configured probabilities (fixed seeds, exact bounds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tasks.demo import annotators as ann
from tasks.demo.malformed import corrupt_rows
from tasks.demo.settings import AnnotatorSpec, SimulatorSettings
from tasks.demo.simulator import label_items


def _synthetic(n_prompts: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    prompts = [f"prompt {i}" for i in range(n_prompts)]
    responses = [[f"response {i}.{j}" for j in range(k)] for i in range(n_prompts)]
    scores = [np.round(rng.uniform(-1, 1, k), 4) for _ in range(n_prompts)]
    return prompts, responses, scores


@pytest.fixture(scope="module")
def labelled() -> pd.DataFrame:
    settings = SimulatorSettings(samples_per_prompt=4, informative_pairs=1, random_pairs=2, labels_per_item=3)
    prompts, responses, scores = _synthetic(3000, 4, seed=1)
    truth, skipped = label_items(prompts, responses, scores, settings, np.random.default_rng(7))
    assert skipped == 0
    return truth


def test_rating_probabilities_match_round_and_clip_of_logistic_noise():
    who = AnnotatorSpec(id="x", temperature=0.3)
    s = np.array([-0.8, 0.0, 0.55])
    probs = ann.rating_probabilities(s, who, (1, 5))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    rng = np.random.default_rng(0)
    center = 1 + (s + 1) / 2 * 4
    draws = np.clip(np.round(center[:, None] + rng.logistic(0, 0.3 * 2, (3, 200_000))), 1, 5)
    empirical = np.stack([(draws == k).mean(axis=1) for k in range(1, 6)], axis=1)
    np.testing.assert_allclose(empirical, probs, atol=0.005)


def test_pairwise_choice_rate_matches_sigmoid_per_annotator(labelled):
    pairs = labelled[(labelled["kind"] == "pairwise") & (labelled["choice"] != "tie")]
    team = {a.id: a for a in SimulatorSettings().annotators}
    for annotator, g in pairs.groupby("annotator_id"):
        spec = team[annotator]
        expected = ann.preference_probability(g["s_a"].to_numpy(), g["s_b"].to_numpy(), spec)
        np.testing.assert_allclose(g["p_a"], expected)
        # Calibration: within probability bins the share of "a" follows the true probability.
        bins = np.minimum((expected * 5).astype(int), 4)
        for b in np.unique(bins):
            sel = bins == b
            count_a = int((g["choice"].to_numpy()[sel] == "a").sum())
            p = expected[sel]
            z = (count_a - p.sum()) / np.sqrt(max((p * (1 - p)).sum(), 1e-9))
            assert abs(z) < 4, (annotator, b, count_a, p.sum())


def test_label_rate_stats_are_consistent_and_spammer_is_at_chance(labelled):
    rates = pd.DataFrame(ann.label_rate_stats(labelled.assign(malformed=None)))
    assert (rates["z"].abs() < 4).all(), rates
    spam = rates[(rates["annotator_id"] == "ann-spammer") & (rates["kind"] == "pairwise")].iloc[0]
    assert spam["expected"] == 0.5
    # two-sided exact binomial test of the spammer's agreement with the oracle
    k = round(spam["observed"] * spam["n"])
    assert stats.binomtest(k, int(spam["n"]), 0.5).pvalue > 1e-3
    careful = rates[(rates["annotator_id"] == "ann-careful") & (rates["kind"] == "pairwise")].iloc[0]
    assert careful["observed"] > 0.9


def test_rating_histogram_matches_its_distribution_chi_square(labelled):
    ratings = labelled[(labelled["kind"] == "rating") & (labelled["annotator_id"] == "ann-noisy")]
    who = next(a for a in SimulatorSettings().annotators if a.id == "ann-noisy")
    probs = ann.rating_probabilities(ratings["s"].to_numpy(), who, (1, 5))
    expected = probs.sum(axis=0)
    observed = np.array([(ratings["score"] == k).sum() for k in range(1, 6)])
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_best_accuracy_is_mean_of_max_probability():
    assert ann.best_accuracy(np.array([0.5, 0.9, 0.2])) == pytest.approx((0.5 + 0.9 + 0.8) / 3)
    assert np.isnan(ann.best_accuracy(np.array([])))


def test_informative_pairs_take_best_against_worst():
    settings = SimulatorSettings(informative_pairs=2, random_pairs=3)
    pairs = ann.select_pairs(np.array([0.1, -0.9, 0.8, 0.3, -0.2]), settings, np.random.default_rng(0))
    assert pairs[:2] == [(2, 1, "informative"), (3, 4, "informative")]
    assert len({frozenset(p[:2]) for p in pairs}) == len(pairs) == 5


def test_novelty_weight_pairs_a_fresh_positive_sample_against_a_stock_negative_one():
    scores = np.array([0.8, 0.75, -0.5, -0.45])
    common = np.array([0.5, 0.1, 0.1, 0.5])  # sample 0 and 3 repeat the batch's frames
    plain = ann.select_pairs(scores, SimulatorSettings(random_pairs=0), np.random.default_rng(0), common)
    assert plain == [(0, 2, "informative")]  # λ = 0: best against worst by score, commonness unused
    steered = ann.select_pairs(scores, SimulatorSettings(random_pairs=0, novelty_weight=0.5),
                               np.random.default_rng(0), common)
    assert steered == [(1, 3, "informative")]  # s − λc: [0.55, 0.70, −0.55, −0.70]
    two = ann.select_pairs(scores, SimulatorSettings(informative_pairs=2, random_pairs=0, novelty_weight=0.5),
                           np.random.default_rng(0), common)
    assert [set(p[:2]) for p in two] == [{1, 3}, {0, 2}]  # each sample once


def test_frame_commonness_is_the_mean_batch_share_of_a_texts_bigrams():
    from tasks.demo.simulator import frame_commonness

    texts = ["a good movie", "a good film", "dull and slow", ""]
    got = frame_commonness(texts)
    # "a good" is in 2 of the 3 non-blank texts, "good movie" in 1: (2/3 + 1/3) / 2
    assert got == pytest.approx([0.5, 0.5, 1 / 3, 0.0])


def test_labels_are_deterministic_and_each_item_has_distinct_annotators():
    settings = SimulatorSettings(labels_per_item=3)
    prompts, responses, scores = _synthetic(50, 4, seed=3)
    a, _ = label_items(prompts, responses, scores, settings, np.random.default_rng(5))
    b, _ = label_items(prompts, responses, scores, settings, np.random.default_rng(5))
    pd.testing.assert_frame_equal(a, b)
    keys = a["prompt"] + "|" + a["response_a"].fillna(a["response"]) + "|" + a["response_b"].fillna("")
    assert a.groupby(keys)["annotator_id"].nunique().eq(a.groupby(keys).size()).all()


def test_corruption_share_and_reasons():
    settings = SimulatorSettings()
    prompts, responses, scores = _synthetic(400, 4, seed=4)
    truth, _ = label_items(prompts, responses, scores, settings, np.random.default_rng(1))
    truth = truth.assign(format=np.where(np.arange(len(truth)) % 2, "parquet", "jsonl"), created_at="2025-01-01T00:00:00Z")
    bad = corrupt_rows(truth, 0.02, (1, 5), np.random.default_rng(2))
    assert bad["malformed"].notna().sum() == round(0.02 * len(truth))
    as_text = lambda f: f.astype(object).where(f.notna(), "<missing>").astype(str)  # noqa: E731
    changed = (as_text(bad.drop(columns="malformed")) != as_text(truth)).any(axis=1)
    assert (changed == bad["malformed"].notna()).all()  # exactly the flagged rows differ
    assert not ((bad["malformed"] == "invalid_label") & (bad["format"] == "parquet")).any()


def test_settings_errors_name_the_field():
    from alignment.config import ConfigError, validate_config
    from tasks.demo.settings import DemoSettings

    with pytest.raises(ConfigError, match=r"demo\.simulator\.malformed_share"):
        validate_config(DemoSettings, {"simulator": {"malformed_share": 0.7}}, prefix="demo")
    with pytest.raises(ConfigError, match="n_embd .* divisible by n_head"):
        validate_config(DemoSettings, {"model": {"n_embd": 100, "n_head": 3}}, prefix="demo")
    with pytest.raises(ConfigError, match="at least one annotator must not be a spammer"):
        validate_config(DemoSettings, {"simulator": {"annotators": [{"id": "x", "spammer": True}]}})
    with pytest.raises(ConfigError, match="kind_shares"):
        validate_config(DemoSettings, {"simulator": {"kind_shares": {"pairwise": -1.0}}})
