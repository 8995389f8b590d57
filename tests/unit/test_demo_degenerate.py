"""Degenerate samples (loops, word stuffing) are kept from the simulated annotators."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.demo import simulator
from tasks.demo.settings import DegenerateFilter, SimulatorSettings
from tasks.demo.simulator import degenerate_reason, simulate_feedback

LOOP = "a good movie with the best thing that's a good movie with a very good movie with the best time in the best time."
STUFFED = "great great film, great acting, great story and great fun"
FINE = ["a fascinating, compelling film that is funny and smart.", "the plot drags but the actors are charming",
        "the best of the best", "an uneven, often clumsy thriller"]


@pytest.mark.parametrize("text", FINE)
def test_ordinary_responses_pass(text):
    assert degenerate_reason(text, DegenerateFilter()) is None


def test_a_loop_is_caught_by_repeated_trigrams():
    assert degenerate_reason(LOOP, DegenerateFilter()).startswith("repeated trigrams")


def test_stuffing_one_word_is_caught_by_its_count():
    assert degenerate_reason(STUFFED, DegenerateFilter()) == "'great' 5 times"
    assert degenerate_reason(STUFFED, DegenerateFilter(max_word_repeats=5, min_distinct1=0.5)) is None


def test_few_distinct_words_are_caught():
    text = "so so so so fun fun fun fun so fun"
    assert degenerate_reason(text, DegenerateFilter(max_repeated_trigram_share=1.0)).startswith("distinct-1")


def test_rejected_samples_never_reach_the_annotators(tmp_path, monkeypatch):
    prompts = [f"prompt number {i}" for i in range(12)]
    texts = [LOOP, STUFFED, FINE[0], FINE[1], FINE[3]]

    def fake_sample(policy_path, drawn, settings, seed):
        return [list(texts) for _ in drawn], [[True, True, True, True, False] for _ in drawn]

    monkeypatch.setattr(simulator, "sample_responses", fake_sample)
    settings = SimulatorSettings(prompts_per_batch=12, samples_per_prompt=5, malformed_share=0.0,
                                 reject_degenerate=DegenerateFilter())
    report = simulate_feedback("unused", prompts, settings, tmp_path / "land", batch_id="b", report_dir=tmp_path / "r")
    truth = pd.read_parquet(tmp_path / "r" / "truth-b.parquet")
    seen = set(truth["response"].dropna()) | set(truth["response_a"].dropna()) | set(truth["response_b"].dropna())
    assert seen == {FINE[0], FINE[1], FINE[3]}
    assert report.rejected_samples == 24 and report.skipped_samples == 24
    # without the filter the annotators see all four
    plain = simulate_feedback("unused", prompts, settings.model_copy(update={"reject_degenerate": None}),
                              tmp_path / "land2", batch_id="b", report_dir=tmp_path / "r2")
    truth = pd.read_parquet(tmp_path / "r2" / "truth-b.parquet")
    seen = set(truth["response"].dropna()) | set(truth["response_a"].dropna()) | set(truth["response_b"].dropna())
    assert seen == set(texts) and plain.rejected_samples == 0

    # unfinished answers (no EOS: the fifth sample) are kept out too under reject_truncated
    both = simulate_feedback("unused", prompts, settings.model_copy(update={"reject_truncated": True}),
                             tmp_path / "land3", batch_id="b", report_dir=tmp_path / "r3")
    truth = pd.read_parquet(tmp_path / "r3" / "truth-b.parquet")
    seen = set(truth["response"].dropna()) | set(truth["response_a"].dropna()) | set(truth["response_b"].dropna())
    assert seen == {FINE[0], FINE[1]} and both.rejected_samples == 36
