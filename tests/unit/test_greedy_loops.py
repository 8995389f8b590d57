"""benchmarks/greedy_loops.py: the looping share and seq-rep-3, against hand counts."""

from __future__ import annotations

from benchmarks.greedy_loops import loop_stats


def test_loop_stats_count_repeated_trigrams_by_hand():
    texts = ["a good movie a good movie a good movie",  # 7 trigrams, 3 unique: rep-3 = 4/7
             "the plot was slow but the actors were fine",  # no repeat: 0
             "great"]  # under 3 words: no trigram, rep-3 0 (as in RESULTS' figures)
    out = loop_stats(texts)
    assert out["mean_seq_rep3"] == round((4 / 7 + 0.0 + 0.0) / 3, 3)
    assert out["looping_share"] == round(1 / 3, 3)
    assert loop_stats(texts, threshold=0.6)["looping_share"] == 0.0
