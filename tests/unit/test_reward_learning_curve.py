"""benchmarks/reward_learning_curve.py's pure parts: vocabulary coverage, the seen-words oracle, the
bag-of-words yardstick (benchmarks/reward_accuracy.py) it compares the reward model with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

curve = pytest.importorskip("benchmarks.reward_learning_curve")

LEXICON = {"good": 1.9, "bad": -2.5, "great": 3.1, "dull": -1.7}


def test_coverage_counts_sentiment_tokens_unseen_and_rare_in_training():
    seen = curve.word_counts(["a good film", "good good good good good", "a bad one"])
    cov = curve.coverage(["Good and great!", "dull, dull and bad", "no sentiment here"], seen, LEXICON, rare=5)
    # sentiment tokens: good great dull dull bad -> great, dull, dull unseen; bad seen once (rare), good 6 times
    assert cov["sentiment_tokens"] == 5
    assert cov["unseen_token_share"] == pytest.approx(3 / 5)
    assert cov["rare_token_share"] == pytest.approx(4 / 5)
    assert cov["unseen_type_share"] == pytest.approx(2 / 4)
    assert curve.all_seen("good but bad", seen, LEXICON)
    assert not curve.all_seen("good but dull", seen, LEXICON)
    assert curve.coverage(["plain words"], seen, LEXICON)["sentiment_tokens"] == 0


def test_limited_oracle_is_vader_on_seen_words_and_blind_to_the_rest():
    from tasks.demo.oracle import sentiment

    texts = ["a wonderful movie", "a terrible movie", "the movie", ""]
    full = curve.limited_oracle(["wonderful", "terrible"])(None, texts)
    assert np.allclose(full, sentiment(texts))
    blind = curve.limited_oracle(["wonderful"])(None, texts)
    assert blind[0] == pytest.approx(full[0]) and blind[0] > 0
    assert blind[1] == 0.0 and blind[2] == 0.0 and blind[3] == 0.0


def test_bag_of_words_yardstick_learns_word_valence_from_pairs():
    from benchmarks.reward_accuracy import _bag_of_words

    rng = np.random.default_rng(0)
    filler = ["the", "movie", "was", "a", "plot", "story"]
    good, bad = ["great", "fun"], ["dull", "awful"]

    def text(w):
        return " ".join([w, *rng.choice(filler, 3)])

    train = pd.DataFrame({"chosen": [text(good[i % 2]) for i in range(40)],
                          "rejected": [text(bad[i % 2]) for i in range(40)], "weight": 1.0})
    score = _bag_of_words(train, 1.0)
    s = score(None, ["great plot", "dull plot", "fun story", "awful story", "unknown words"])
    assert s[0] > 0 > s[1] and s[2] > 0 > s[3]
    assert s[4] == 0.0  # no feature of a word never trained on


def test_memoized_scores_each_distinct_response_once_and_keeps_the_order():
    calls = []

    def score(prompts, responses):
        calls.append(list(responses))
        return np.array([len(r) for r in responses], float)

    memo = curve.memoized(score)
    assert memo(["p", "p", "q"], ["aa", "aa", "aa"]).tolist() == [2.0, 2.0, 2.0]
    assert memo(["q", "p", "p"], ["aa", "bbb", "aa"]).tolist() == [2.0, 3.0, 2.0]
    # ("p", "aa") and ("q", "aa") once each in the first call, only ("p", "bbb") is new in the second
    assert calls == [["aa", "aa"], ["bbb"]]
