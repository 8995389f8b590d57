"""The unpaired (KTO) set: single responses labelled desirable or undesirable, by weighted vote.

Every source casts votes on a (prompt, response) item, each vote ``up`` (1: desirable, 0:
undesirable) with a weight:

* thumbs (``binary``): each thumbs row, weighted by its annotator's vote factor;
* ratings: each rating row votes with its annotator's factor, in the direction of the
  response's weighted mean score: desirable when at least ``rating_desirable_min``,
  undesirable when at most ``rating_undesirable_max`` (between: no votes);
* comparisons (pairwise and ranking rows, after vote aggregation): each non-tied pair votes its
  chosen response desirable and its rejected one undesirable, with the pair's weight.

Per item: W = sum of weights, share = (weighted up votes) / W. The label is ``share > 0.5``; an
exact tie (or W = 0) drops the item; ``agreement`` = max(share, 1 - share) and the weight is
W / (number of votes), as for pairs; items below ``min_agreement`` are dropped or down-weighted
by ``low_agreement`` like pairs. A response that is chosen in one pair and rejected in another
thus cancels out: the set keeps responses the feedback says something definite about.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.data.aggregate import PairSet
from tasks.data.keys import group_ids
from tasks.data.settings import PreferenceSettings
from tasks.data.votes import Judgements


@dataclass
class UnpairedSet:
    """Labelled items as codes: prompt, response, label (True = desirable), weight, agreement."""

    prompt: np.ndarray
    response: np.ndarray
    label: np.ndarray
    weight: np.ndarray
    agreement: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    def select(self, index: np.ndarray) -> UnpairedSet:
        return UnpairedSet(self.prompt[index], self.response[index], self.label[index], self.weight[index],
                           self.agreement[index])


def _vote_weights(annotator: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """Each row's annotator factor (anonymous rows, code -1, weigh 1)."""
    if not len(factor):
        return np.ones(len(annotator))
    return np.where(annotator >= 0, factor[np.maximum(annotator, 0)], 1.0)


def _rating_votes(r: Judgements, factor: np.ndarray, settings: PreferenceSettings):
    """One vote per rating row, its direction set by the response's weighted mean score."""
    w = _vote_weights(r.annotator, factor)
    group, n = group_ids(r.prompt, r.response)
    wsum = np.bincount(group, weights=w, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(group, weights=w * r.value, minlength=n) / wsum
    up, down = mean >= settings.rating_desirable_min, mean <= settings.rating_undesirable_max
    keep = ((wsum > 0) & (up | down))[group]
    return r.prompt[keep], r.response[keep], up[group][keep].astype(np.float64), w[keep]


def unpaired_items(thumbs: Judgements, ratings: Judgements, comparisons: PairSet, factor: np.ndarray,
                   settings: PreferenceSettings, counts: dict) -> UnpairedSet:
    """Resolve the votes of ``settings.unpaired_sources`` into labelled items (module docstring).

    ``comparisons`` are the aggregated comparison pairs (ties marked), ``factor`` the annotator
    vote factors. Adds ``unpaired_votes_from_<source>``, ``unpaired_ties`` and
    ``unpaired_low_agreement`` to ``counts``. Items come out in no particular order.
    """
    sources = set(settings.unpaired_sources)
    prompt, response, up, weight = [], [], [], []

    def add(name: str, p, r, u, w) -> None:
        counts[f"unpaired_votes_from_{name}"] = int(len(p))
        prompt.append(np.asarray(p, np.int64))
        response.append(np.asarray(r, np.int64))
        up.append(np.asarray(u, np.float64))
        weight.append(np.asarray(w, np.float64))

    if "binary" in sources:
        add("thumbs", thumbs.prompt, thumbs.response, thumbs.value, _vote_weights(thumbs.annotator, factor))
    if "rating" in sources:
        add("ratings", *_rating_votes(ratings, factor, settings))
    if "comparisons" in sources:
        c = comparisons.select(~comparisons.tie)
        add("comparisons", np.concatenate([c.prompt, c.prompt]), np.concatenate([c.chosen, c.rejected]),
            np.repeat([1.0, 0.0], len(c)), np.concatenate([c.weight, c.weight]))
    if not prompt:
        empty = np.zeros(0, np.int64)
        return UnpairedSet(empty, empty, np.zeros(0, bool), np.zeros(0), np.zeros(0))
    p, r, u, w = (np.concatenate(x) for x in (prompt, response, up, weight))
    group, n = group_ids(p, r)
    first = np.zeros(n, np.int64)
    first[group] = np.arange(len(group))
    total = np.bincount(group, weights=w, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.bincount(group, weights=w * u, minlength=n) / total
    decided = (total > 0) & (np.abs(share - 0.5) > 1e-12)
    counts["unpaired_ties"] = int((~decided).sum())
    votes = np.bincount(group, minlength=n)
    items = UnpairedSet(p[first], r[first], share > 0.5, total / np.maximum(votes, 1), np.maximum(share, 1 - share))
    items = items.select(np.flatnonzero(decided))
    low = items.agreement < settings.min_agreement
    counts["unpaired_low_agreement"] = int(low.sum())
    if settings.low_agreement == "drop":
        items = items.select(np.flatnonzero(~low))
    else:
        items.weight[low] *= settings.low_agreement_weight
    return items
