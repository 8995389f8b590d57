"""Simulated annotators: how oracle scores become labels, and what those labels can tell.

An annotator of temperature T who sees responses with oracle scores s_a and s_b prefers a with
probability ``sigmoid((s_a - s_b) / T)`` (Bradley–Terry); a spammer answers a or b with
probability 1/2 whatever the text. A rating on the integer scale [lo, hi] is the sentiment
mapped linearly onto the scale, plus logistic noise of scale ``T * (hi - lo) / 2``, rounded and
clipped (its exact distribution is :func:`rating_probabilities`); a thumbs-up comes with
probability ``sigmoid(s / T)``. Spammers rate uniformly and give thumbs at random.

Because the simulator knows every label's true probability, it knows the best accuracy any
reward model could reach on the labels: predicting the likelier answer is right with
probability max(p, 1 - p), so no model can beat ``mean(max(p, 1 - p))``
(:func:`best_accuracy`). :func:`label_rate_stats` compares observed label rates with the
configured ones per annotator (a z-score each).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tasks.demo.settings import AnnotatorSpec, SimulatorSettings


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # overflow-free


def preference_probability(s_a: np.ndarray, s_b: np.ndarray, annotator: AnnotatorSpec) -> np.ndarray:
    """P(choice = a) = sigmoid((s_a - s_b) / T); 1/2 for a spammer."""
    diff = np.asarray(s_a, np.float64) - np.asarray(s_b, np.float64)
    return np.full_like(diff, 0.5) if annotator.spammer else sigmoid(diff / annotator.temperature)


def thumbs_up_probability(s: np.ndarray, annotator: AnnotatorSpec) -> np.ndarray:
    """P(label = True) = sigmoid(s / T); 1/2 for a spammer."""
    s = np.asarray(s, np.float64)
    return np.full_like(s, 0.5) if annotator.spammer else sigmoid(s / annotator.temperature)


def rating_probabilities(s: np.ndarray, annotator: AnnotatorSpec, scale: tuple[int, int]) -> np.ndarray:
    """``[n, hi - lo + 1]`` probabilities of each integer rating lo..hi (uniform for a spammer).

    Rating = clip(round(lo + (s + 1) / 2 * (hi - lo) + Logistic(0, T * (hi - lo) / 2)), lo, hi),
    so P(k) = F(k + 1/2) - F(k - 1/2) with the ends open, F the logistic CDF around the mean.
    """
    lo, hi = scale
    s = np.asarray(s, np.float64)
    levels = hi - lo + 1
    if annotator.spammer:
        return np.full((len(s), levels), 1.0 / levels)
    center = lo + (s + 1.0) / 2.0 * (hi - lo)
    width = annotator.temperature * (hi - lo) / 2.0
    edges = np.arange(lo, hi) + 0.5  # the hi - lo inner cut points
    cdf = sigmoid((edges[None, :] - center[:, None]) / width)
    cdf = np.concatenate([np.zeros((len(s), 1)), cdf, np.ones((len(s), 1))], axis=1)
    return np.diff(cdf, axis=1)


def select_pairs(scores: np.ndarray, settings: SimulatorSettings, rng: np.random.Generator,
                 commonness: np.ndarray | None = None) -> list[tuple[int, int, str]]:
    """Pairs ``(i, j, kind)`` of distinct sample indices to compare for one prompt.

    ``informative`` pairs match the k-th best with the k-th worst sample by score (k = 0, 1, ...,
    while they are distinct); with ``settings.novelty_weight`` λ > 0 and the samples' frame
    ``commonness`` c, by the adjusted score s − λ·c instead (a positive sample in its own words
    against a negative one in the batch's stock phrasing). ``random`` pairs are further distinct
    pairs drawn uniformly among those not chosen yet. The order within a pair is not randomised here.
    """
    n = len(scores)
    lam = settings.novelty_weight if commonness is not None else 0.0
    order = np.argsort(scores - lam * commonness if lam else scores, kind="stable")
    chosen: list[tuple[int, int, str]] = []
    used: set[frozenset[int]] = set()
    for k in range(min(settings.informative_pairs, n // 2)):
        i, j = int(order[n - 1 - k]), int(order[k])
        chosen.append((i, j, "informative"))
        used.add(frozenset((i, j)))
    free = [(i, j) for i in range(n) for j in range(i + 1, n) if frozenset((i, j)) not in used]
    take = min(settings.random_pairs, len(free))
    for idx in rng.choice(len(free), size=take, replace=False) if take else []:
        chosen.append((*free[int(idx)], "random"))
    return chosen


def best_accuracy(p_a: np.ndarray) -> float:
    """Highest expected accuracy of any predictor on labels drawn with P(a) = ``p_a``: mean max(p, 1 - p)."""
    p = np.asarray(p_a, np.float64)
    if not len(p):
        return float("nan")
    return float(np.mean(np.maximum(p, 1.0 - p)))


def _z(observed: float, expected: float, variance: float) -> float:
    return float((observed - expected) / np.sqrt(variance)) if variance > 0 else 0.0


def label_rate_stats(truth: pd.DataFrame) -> list[dict]:
    """Observed vs configured label rates per annotator and kind, on well-formed rows.

    pairwise: rate of choosing the side the oracle scores higher (ties and equal scores left
    out) against its expected rate mean(sigmoid(|s_a - s_b| / T)); binary: thumbs-up rate
    against mean P(up); rating: mean score against its expectation. ``z`` is the standardised
    difference of the counts (sums), approximately N(0, 1) when the simulator is right.
    """
    rows = []
    ok = truth[truth["malformed"].isna()]
    for (annotator, kind), group in ok.groupby(["annotator_id", "kind"], sort=True):
        if kind == "pairwise":
            g = group[(group["choice"] != "tie") & (group["s_a"] != group["s_b"])]
            a_higher = (g["s_a"] > g["s_b"]).to_numpy()
            p_fav = np.where(a_higher, g["p_a"], 1.0 - g["p_a"])
            agree = np.where(a_higher, g["choice"] == "a", g["choice"] == "b")
            obs, exp, var, n = agree.sum(), p_fav.sum(), (p_fav * (1 - p_fav)).sum(), len(g)
            metric = "agree_with_oracle"
        elif kind == "binary":
            p = group["p_up"].to_numpy()
            obs, exp, var, n = group["label"].astype(bool).sum(), p.sum(), (p * (1 - p)).sum(), len(group)
            metric = "thumbs_up"
        else:
            obs, exp, var, n = group["score"].sum(), group["score_mean"].sum(), group["score_var"].sum(), len(group)
            metric = "score"
        rows.append({
            "annotator_id": annotator, "kind": kind, "metric": metric, "n": int(n),
            "observed": float(obs / n) if n else float("nan"),
            "expected": float(exp / n) if n else float("nan"),
            "z": _z(float(obs), float(exp), float(var)),
        })  # fmt: skip
    return rows
