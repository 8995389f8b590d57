"""Drift detectors fire on shifted feedback and stay quiet on same-distribution feedback
(false-positive rate measured over many seeds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from tasks.evaluation.drift import DriftReport, monitor_batch
from tasks.evaluation.settings import MonitorSettings

GOOD = "good great lovely superb wonderful fine".split()
BAD = "bad awful dull poor boring terrible".split()
MOVIES = "the a movie film plot actor scene music ending story cast was is and it very".split()
COOKING = "recipe oven salt pepper garlic onion butter bake fry simmer dough sauce".split()


def sentiment_scorer(prompts, responses):
    """The 'champion reward model': good words minus bad words."""
    return [sum(w in GOOD for w in r.split()) - sum(w in BAD for w in r.split()) for r in responses]


def feedback(n: int, seed: int, *, topic=MOVIES, resp_len=(4, 12), p_a_bias: float | None = None,
             consistency: float = 0.85, inverted: bool = False, repeat_share: float = 0.3) -> pd.DataFrame:
    """Pairwise feedback: annotators pick the response with more positive words with
    probability ``consistency`` (the negative one when ``inverted``); a ``repeat_share`` of the
    items is labelled by three annotators; ``p_a_bias`` makes them pick 'a' with that probability."""
    rng = np.random.default_rng(seed)

    def response():
        words = list(rng.choice(topic, rng.integers(*resp_len)))
        words += list(rng.choice(GOOD, rng.integers(0, 3))) + list(rng.choice(BAD, rng.integers(0, 3)))
        rng.shuffle(words)
        return " ".join(words)

    rows, item = [], 0
    while len(rows) < n:
        prompt = " ".join(rng.choice(topic, rng.integers(3, 9)))
        a, b = response(), response()
        sa, sb = sentiment_scorer(None, [a, b])
        for annotator in range(3 if rng.random() < repeat_share else 1):
            if p_a_bias is not None:
                choice = "a" if rng.random() < p_a_bias else "b"
            elif sa == sb:
                choice = rng.choice(["a", "b"])
            else:
                better = "a" if (sa > sb) != inverted else "b"
                choice = better if rng.random() < consistency else {"a": "b", "b": "a"}[better]
            rows.append({"prompt": prompt, "response_a": a, "response_b": b, "choice": choice,
                         "annotator_id": f"ann{annotator}", "item": item})
        item += 1
    return pd.DataFrame(rows[:n])


def fired(report: DriftReport) -> set[str]:
    return {c.name for c in report.checks if c.triggered}


@pytest.mark.parametrize("name,shifted", [
    ("response_length", dict(resp_len=(14, 30))),
    ("prompt_vocabulary", dict(topic=COOKING)),
    ("preference_balance", dict(p_a_bias=0.8)),
    ("annotator_agreement", dict(consistency=0.55, repeat_share=0.8)),
    ("reward_accuracy", dict(inverted=True)),
])
def test_each_detector_fires_on_its_shift(name, shifted):
    ref = feedback(300, seed=1, repeat_share=0.8 if name == "annotator_agreement" else 0.3)
    new = feedback(300, seed=2, **shifted)
    report = monitor_batch(new, ref, MonitorSettings(), reward_scorer=sentiment_scorer)
    assert name in fired(report)
    assert report.triggered and any(r.startswith(f"{name}:") for r in report.reasons)
    assert report.check(name).pvalue < 0.01


def test_same_distribution_stays_quiet_and_reports_everything():
    report = monitor_batch(feedback(300, seed=3), feedback(300, seed=4), MonitorSettings(),
                           reward_scorer=sentiment_scorer)
    assert not report.triggered and report.reasons == []
    assert {c.name for c in report.checks} == {"prompt_length", "response_length", "prompt_vocabulary",
                                               "response_vocabulary", "preference_balance",
                                               "annotator_agreement", "reward_accuracy"}
    acc = report.check("reward_accuracy")
    assert 0.7 < acc.value < 0.9 and acc.stats["accuracy_reference"] > 0.7
    metrics = report.metrics()
    assert metrics["drift/triggered"] == 0.0 and "drift/response_vocabulary/noise_floor" in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    assert "| reward_accuracy |" in report.to_markdown()


def test_false_positive_rate_is_near_nominal():
    """150 pairs of same-distribution batches at alpha = 0.05: the exact permutation test rejects
    about 5% of the time, the others at most about that (KS on integer lengths is conservative);
    a check fires only on a rejection plus a material effect, so each fires at most that often
    and the monitor as a whole at most (number of checks) x alpha."""
    alpha, seeds = 0.05, 150
    settings = MonitorSettings(alpha=alpha, permutation_rounds=39, min_rows=10)
    rejections: dict[str, int] = {}
    fires: dict[str, int] = {}
    triggered = 0
    for seed in range(seeds):
        report = monitor_batch(feedback(80, seed=2 * seed, repeat_share=0.0),
                               feedback(80, seed=2 * seed + 1, repeat_share=0.0), settings, seed=seed)
        triggered += report.triggered
        for c in report.checks:
            rejections[c.name] = rejections.get(c.name, 0) + (c.pvalue is not None and c.pvalue < alpha)
            fires[c.name] = fires.get(c.name, 0) + c.triggered
    vocab_rate = (rejections["prompt_vocabulary"] + rejections["response_vocabulary"]) / (2 * seeds)
    assert abs(vocab_rate - alpha) < 3 * math.sqrt(alpha * (1 - alpha) / (2 * seeds)), vocab_rate
    limit = alpha + 3 * math.sqrt(alpha * (1 - alpha) / seeds)
    for name, count in rejections.items():
        assert count / seeds < limit and fires[name] <= count, (name, rejections, fires)
    assert triggered / seeds <= len(rejections) * alpha


def test_small_batches_are_reported_but_not_acted_on():
    report = monitor_batch(feedback(10, seed=5, topic=COOKING, resp_len=(20, 30)), feedback(300, seed=6),
                           MonitorSettings(min_rows=30))
    assert not report.triggered and report.rows_new == 10
    assert all("not acted on" in c.message for c in report.checks)


def test_other_kinds_and_bad_input():
    rng = np.random.default_rng(0)

    def thumbs(n, p_up):
        return pd.DataFrame({"prompt": ["the movie"] * n, "response": [" ".join(rng.choice(MOVIES, 6)) for _ in range(n)],
                             "label": rng.random(n) < p_up})

    report = monitor_batch(thumbs(300, 0.8), thumbs(300, 0.4), MonitorSettings())
    assert "preference_balance" in fired(report)
    ratings = pd.DataFrame({"prompt": ["p"] * 200, "response": ["r s t"] * 200, "score": rng.integers(1, 4, 200)})
    shifted = ratings.assign(score=rng.integers(3, 6, 200))
    assert "rating_score" in fired(monitor_batch(shifted, ratings, MonitorSettings()))
    chat = feedback(50, seed=7).assign(is_chat=True)
    chat["prompt"] = [json.dumps([{"role": "user", "content": p}]) for p in chat["prompt"]]
    assert monitor_batch(chat, chat, MonitorSettings()).check("prompt_length").stats["mean_new"] < 10
    with pytest.raises(ValueError, match="new_batch is empty"):
        monitor_batch(ratings.iloc[:0], ratings, MonitorSettings())
    with pytest.raises(ValueError, match="no 'prompt' column"):
        monitor_batch(ratings.drop(columns="prompt"), ratings, MonitorSettings())
