"""Annotator quality and label aggregation, on integer codes (see :mod:`tasks.data.votes`).

Annotator quality: on every item (a response pair for comparisons, a response for thumbs) an
annotator's label is compared with the majority label of the *other* annotators on that item
(leave-one-out; items where the others are absent or split evenly are not scored). Agreement
is the share of scored items where they match: careful annotators score well above 0.5,
random answering about 0.5 on two-way labels (about 1/3 with three-way choices). Ratings are
not scored (a continuous score has no majority).

Aggregation: comparisons of the same item are weighted votes (weight 1, times the annotator's
factor); the outcome with the largest weight wins, equal top weights make a tie; agreement is
the winning weight over the total; a pair's weight is the mean vote weight on the winning side.
Thumbs and ratings become pairs within a prompt, their agreement being the probability that a
random judgement of the chosen response beats one of the rejected (ties count half).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from tasks.data.keys import group_ids, mix64
from tasks.data.settings import PreferenceSettings
from tasks.data.votes import Comparisons, Judgements


@dataclass
class AnnotatorStats:
    """Per annotator code: comparison and thumbs labels given, those scored against the others,
    matches, flag, vote factor, and ratings given (not scored)."""

    labels: np.ndarray
    scored: np.ndarray
    agreed: np.ndarray
    flagged: np.ndarray
    factor: np.ndarray
    ratings: np.ndarray

    @property
    def agreement(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.scored > 0, self.agreed / np.maximum(self.scored, 1), np.nan)


def loo_agreement(item: np.ndarray, label: np.ndarray, annotator: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label: (scored, agreed) against the leave-one-out majority of the other annotators.

    ``annotator`` -1 means anonymous: such labels count for the others' majority but are not scored.
    """
    n = len(item)
    if n == 0:
        return np.zeros(0, bool), np.zeros(0, bool)
    items, n_items = group_ids(item)  # dense ids whatever ``item`` holds
    counts = np.bincount(items * n_labels + label, minlength=n_items * n_labels).reshape(n_items, n_labels)
    # one annotator's own labels on an item are all left out (anonymous labels: only themselves)
    who = np.where(annotator >= 0, annotator, -1 - np.arange(n))
    own_id, n_own = group_ids(items, who)
    own = np.bincount(own_id * n_labels + label, minlength=n_own * n_labels).reshape(n_own, n_labels)
    others = counts[items] - own[own_id]
    top = others.max(axis=1)
    unique_top = (others == top[:, None]).sum(axis=1) == 1
    scored = (others.sum(axis=1) > 0) & unique_top & (annotator >= 0)
    agreed = scored & (others.argmax(axis=1) == label)
    return scored, agreed


def annotator_quality(comparisons: Comparisons, thumbs: Judgements, n_annotators: int,
                      settings: PreferenceSettings, ratings: Judgements | None = None) -> AnnotatorStats:
    """Score every annotator on comparisons and thumbs; flag those below ``annotator_min_agreement``
    with at least ``annotator_min_items`` scored labels; set vote factors by ``annotator_action``."""
    comp_item, n_comp = comparisons.items
    thumb_item, _ = group_ids(thumbs.prompt, thumbs.response)
    item = np.concatenate([comp_item, thumb_item + n_comp])
    label = np.concatenate([comparisons.outcome.astype(np.int64), thumbs.value.astype(np.int64)])
    annotator = np.concatenate([comparisons.annotator, thumbs.annotator])
    scored, agreed = loo_agreement(item, label, annotator, 3)
    known = annotator >= 0
    labels = np.bincount(annotator[known], minlength=n_annotators)
    n_scored = np.bincount(annotator[scored], minlength=n_annotators)
    n_agreed = np.bincount(annotator[agreed], minlength=n_annotators)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n_scored > 0, n_agreed / np.maximum(n_scored, 1), 1.0)
    flagged = (n_scored >= settings.annotator_min_items) & (rate < settings.annotator_min_agreement)
    factor = np.ones(n_annotators)
    if settings.annotator_action == "downweight":
        factor[flagged] = settings.annotator_downweight
    elif settings.annotator_action == "exclude":
        factor[flagged] = 0.0
    rated = ratings.annotator[ratings.annotator >= 0] if ratings is not None else np.zeros(0, np.int64)
    return AnnotatorStats(labels, n_scored, n_agreed, flagged, factor, np.bincount(rated, minlength=n_annotators))


@dataclass
class PairSet:
    """Candidate pairs (codes) with their annotators as (pair index, annotator code) links."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    weight: np.ndarray
    agreement: np.ndarray
    tie: np.ndarray
    link_pair: np.ndarray
    link_annotator: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    @classmethod
    def empty(cls) -> PairSet:
        i = np.zeros(0, np.int64)
        return cls(i, i, i, np.zeros(0), np.zeros(0), np.zeros(0, bool), i, i)

    def select(self, index: np.ndarray) -> PairSet:
        """Rows by position (a boolean mask or integer positions, repeats allowed), links carried along."""
        index = np.flatnonzero(index) if index.dtype == bool else index
        order = np.argsort(self.link_pair, kind="stable")
        lp, la = self.link_pair[order], self.link_annotator[order]
        starts = np.searchsorted(lp, index, side="left")
        sizes = np.searchsorted(lp, index, side="right") - starts
        out_start = np.cumsum(sizes) - sizes
        take = np.arange(sizes.sum()) - np.repeat(out_start, sizes) + np.repeat(starts, sizes)
        new_pair = np.repeat(np.arange(len(index)), sizes)
        return PairSet(self.prompt[index], self.chosen[index], self.rejected[index], self.weight[index],
                       self.agreement[index], self.tie[index], new_pair, la[take])

    @classmethod
    def concat(cls, sets: list[PairSet]) -> PairSet:
        offsets = np.cumsum([0] + [len(s) for s in sets])
        out = {f.name: np.concatenate([getattr(s, f.name) for s in sets]) for f in fields(cls) if f.name != "link_pair"}
        out["link_pair"] = np.concatenate([s.link_pair + off for s, off in zip(sets, offsets, strict=False)])
        return cls(**out)


def _links(group: np.ndarray, annotator: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (group, annotator) links of known annotators, sorted."""
    known = annotator >= 0
    if not known.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ids, _ = group_ids(group[known], annotator[known])
    first = np.zeros(ids.max() + 1, np.int64)
    first[ids] = np.flatnonzero(known)
    return group[first], annotator[first]


def aggregate_comparisons(c: Comparisons, factor: np.ndarray) -> PairSet:
    """Weighted vote per item; ties marked (``tie``) with chosen/rejected = x/y."""
    w = np.where(c.annotator >= 0, factor[np.maximum(c.annotator, 0)] if len(factor) else 1.0, 1.0)
    keep = w > 0
    if not keep.all():  # (all kept: the items already grouped for annotator scoring hold)
        c = Comparisons(c.prompt[keep], c.x[keep], c.y[keep], c.outcome[keep], c.annotator[keep])
        w = w[keep]
    item, n = c.items
    if n == 0:
        return PairSet.empty()
    first = np.zeros(n, np.int64)
    first[item] = np.arange(len(item))
    key = item * 3 + c.outcome
    W = np.bincount(key, weights=w, minlength=3 * n).reshape(n, 3)
    C = np.bincount(key, minlength=3 * n).reshape(n, 3)
    wx, wy, wt = W[:, 0], W[:, 1], W[:, 2]
    x_wins = wx > np.maximum(wy, wt)
    y_wins = wy > np.maximum(wx, wt)
    tie = ~(x_wins | y_wins)
    total = W.sum(axis=1)
    agreement = W.max(axis=1) / total
    weight = np.where(x_wins, wx / np.maximum(C[:, 0], 1),
                      np.where(y_wins, wy / np.maximum(C[:, 1], 1), total / np.maximum(C.sum(axis=1), 1)))
    x, y = c.x[first], c.y[first]
    link_pair, link_ann = _links(item, c.annotator)
    return PairSet(c.prompt[first], np.where(y_wins, y, x), np.where(y_wins, x, y), weight, agreement, tie,
                   link_pair, link_ann)


def _per_response(j: Judgements, factor: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Per (prompt, response): weighted sums; also each judgement's group id and weight."""
    w = np.where(j.annotator >= 0, factor[np.maximum(j.annotator, 0)] if len(factor) else 1.0, 1.0)
    group, n = group_ids(j.prompt, j.response)
    first = np.zeros(n, np.int64)
    first[group] = np.arange(len(group))
    frame = pd.DataFrame({
        "group": np.arange(n), "prompt": j.prompt[first], "response": j.response[first],
        "wsum": np.bincount(group, weights=w, minlength=n), "count": np.bincount(group, minlength=n),
        "wvalue": np.bincount(group, weights=w * j.value, minlength=n),
    })
    return frame, group, w


def _pairs_from_groups(pairs: pd.DataFrame, agreement: np.ndarray, j: Judgements, group: np.ndarray, w: np.ndarray,
                       settings: PreferenceSettings, response_hash: np.ndarray) -> PairSet:
    """Finish judgement-derived pairs: cap per prompt, weights, annotator links (union of both sides)."""
    pairs = pairs.assign(agreement=agreement)
    if settings.max_pairs_per_prompt is not None and len(pairs):
        order_key = mix64(response_hash[pairs["response_c"].to_numpy()], response_hash[pairs["response_r"].to_numpy()])
        pairs = pairs.assign(_k=order_key).sort_values(["prompt", "_k"])
        pairs = pairs[pairs.groupby("prompt").cumcount() < settings.max_pairs_per_prompt].drop(columns="_k")
    pairs = pairs.reset_index(drop=True)
    weight = (pairs["wsum_c"] + pairs["wsum_r"]) / (pairs["count_c"] + pairs["count_r"])
    keep = w > 0
    side = pd.DataFrame({"group": group[keep], "annotator": j.annotator[keep]})
    side = side[side["annotator"] >= 0].drop_duplicates()
    idx = pd.DataFrame({"pair": np.arange(len(pairs)), "gc": pairs["group_c"], "gr": pairs["group_r"]})
    links = pd.concat([idx.merge(side, left_on="gc", right_on="group")[["pair", "annotator"]],
                       idx.merge(side, left_on="gr", right_on="group")[["pair", "annotator"]]]).drop_duplicates()
    links = links.sort_values(["pair", "annotator"])
    return PairSet(pairs["prompt"].to_numpy(np.int64), pairs["response_c"].to_numpy(np.int64),
                   pairs["response_r"].to_numpy(np.int64), weight.to_numpy(np.float64),
                   pairs["agreement"].to_numpy(np.float64), np.zeros(len(pairs), bool),
                   links["pair"].to_numpy(np.int64), links["annotator"].to_numpy(np.int64))


def thumbs_to_pairs(j: Judgements, factor: np.ndarray, settings: PreferenceSettings,
                    response_hash: np.ndarray) -> PairSet:
    """Responses to one prompt with a weighted-majority thumbs up x ones with a majority down."""
    if len(j.prompt) == 0:
        return PairSet.empty()
    per, group, w = _per_response(j, factor)
    per = per[per["wsum"] > 0]
    per = per.assign(share=per["wvalue"] / per["wsum"], h=response_hash[per["response"].to_numpy()])
    cols = ["group", "prompt", "response", "wsum", "count", "share", "h"]
    up = per.loc[per["share"] > 0.5, cols]
    down = per.loc[per["share"] < 0.5, cols]
    if settings.binary_pairing == "balanced":
        up = up.sort_values(["prompt", "h"]).assign(rank=lambda d: d.groupby("prompt").cumcount())
        down = down.sort_values(["prompt", "h"]).assign(rank=lambda d: d.groupby("prompt").cumcount())
        pairs = up.merge(down, on=["prompt", "rank"], suffixes=("_c", "_r"))
    else:
        pairs = up.merge(down, on="prompt", suffixes=("_c", "_r"))
    agreement = (0.5 + 0.5 * (pairs["share_c"] - pairs["share_r"])).to_numpy()
    return _pairs_from_groups(pairs, agreement, j, group, w, settings, response_hash)


def ratings_to_pairs(j: Judgements, factor: np.ndarray, settings: PreferenceSettings,
                     response_hash: np.ndarray) -> PairSet:
    """Responses to one prompt whose weighted mean scores differ by at least ``rating_min_gap``."""
    if len(j.prompt) == 0:
        return PairSet.empty()
    per, group, w = _per_response(j, factor)
    per = per[per["wsum"] > 0]
    per = per.assign(mean=per["wvalue"] / per["wsum"])[["group", "prompt", "response", "wsum", "count", "mean"]]
    pairs = per.merge(per, on="prompt", suffixes=("_c", "_r"))
    pairs = pairs[pairs["mean_c"] - pairs["mean_r"] >= settings.rating_min_gap].reset_index(drop=True)
    # agreement: P(a rating of the chosen > a rating of the rejected), ties half, weighted
    single = pd.DataFrame({"group": group, "score": j.value, "w": w})
    single = single[single["w"] > 0]
    pid = pd.DataFrame({"pair": np.arange(len(pairs)), "gc": pairs["group_c"], "gr": pairs["group_r"]})
    cross = pid.merge(single.rename(columns={"group": "gc", "score": "sc", "w": "wc"}), on="gc") \
               .merge(single.rename(columns={"group": "gr", "score": "sr", "w": "wr"}), on="gr")
    ww = cross["wc"] * cross["wr"]
    win = ww * ((cross["sc"] > cross["sr"]) + 0.5 * (cross["sc"] == cross["sr"]))
    sums = pd.DataFrame({"pair": cross["pair"], "win": win, "ww": ww}).groupby("pair")[["win", "ww"]].sum()
    agreement = (sums["win"] / sums["ww"]).reindex(np.arange(len(pairs))).to_numpy()
    return _pairs_from_groups(pairs, agreement, j, group, w, settings, response_hash)
