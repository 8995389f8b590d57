"""The drift budget's decision (alignment.budget): KL and distinct-2 limits, pure."""

from __future__ import annotations

import pytest

from alignment.budget import ProbeReading, budget_breach
from alignment.config import DPOConfig
from alignment.text_stats import distinct_n


def reading(kl=1.0, d2=0.6, ref_d2=0.6, step=10):
    return ProbeReading(step=step, kl=kl, distinct2=d2, reference_distinct2=ref_d2)


def test_distinct2_counts_unique_word_bigrams_pooled_over_texts():
    assert distinct_n(["a good film", "a good film"], 2) == pytest.approx(2 / 4)
    assert distinct_n(["Great!", "a"], 2) == 1.0  # "great !" is the only bigram
    assert distinct_n(["one", ""], 2) == 0.0


def test_within_both_limits_is_no_breach():
    assert budget_breach(reading(kl=4.9, d2=0.48, ref_d2=0.6), max_kl=5.0, min_distinct2_ratio=0.8) is None


def test_kl_past_the_budget_is_named():
    why = budget_breach(reading(kl=5.1, step=15), max_kl=5.0, min_distinct2_ratio=None)
    assert why is not None and "KL 5.10" in why and "step 15" in why


def test_distinct2_under_the_floor_is_named_as_a_share_of_the_reference():
    r = reading(kl=1.0, d2=0.45, ref_d2=0.6)
    assert r.distinct2_ratio == pytest.approx(0.75)
    why = budget_breach(r, max_kl=5.0, min_distinct2_ratio=0.8)
    assert why is not None and "75%" in why and "80%" in why


def test_unset_limits_never_stop():
    assert budget_breach(reading(kl=1e6, d2=0.0), max_kl=None, min_distinct2_ratio=None) is None


def test_reference_without_bigrams_counts_as_full_diversity():
    assert reading(d2=0.0, ref_d2=0.0).distinct2_ratio == 1.0


def test_dpo_config_takes_a_budget_and_defaults_to_none():
    assert DPOConfig().budget is None
    cfg = DPOConfig(budget={"max_kl": 4.0, "every": 3})
    assert cfg.budget.max_kl == 4.0 and cfg.budget.every == 3 and cfg.budget.min_distinct2_ratio is None
    with pytest.raises(ValueError):
        DPOConfig(budget={"max_kl": -1.0})
