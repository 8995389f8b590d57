"""The unpaired (KTO) table the preference builder writes beside the pairs: hand-worked votes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.data.landing import ingest
from tasks.data.preferences import build_preferences
from tasks.data.settings import IngestSettings, PreferenceSettings

COLUMNS = ["prompt", "is_chat", "completion", "label", "weight", "agreement", "split"]


def _build(tmp_path: Path, files: dict[str, list[dict]], **settings):
    landing = tmp_path / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    for fname, rows in files.items():
        (landing / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(IngestSettings(landing_dir=str(landing), quarantine_max_share=0.0), tmp_path / "store")
    build = build_preferences(tmp_path / "store" / "validated", tmp_path / "ds",
                              PreferenceSettings(**{"min_agreement": 0.0, "min_pairs": 0, **settings}))
    return build, pd.read_parquet(build.unpaired)


def _labels(frame: pd.DataFrame) -> dict[tuple[str, str], bool]:
    return {(p, c): bool(lab) for p, c, lab in zip(frame["prompt"], frame["completion"], frame["label"], strict=True)}


THUMBS = [("p", "x", True, "a"), ("p", "y", False, "b"), ("p", "z", True, "a"), ("p", "z", False, "b"),
          ("p", "w", True, "a"), ("p", "w", True, "c"), ("p", "w", False, "b"), ("q", "v", True, "a")]


def test_thumbs_become_unpaired_items_by_weighted_vote(tmp_path):
    build, frame = _build(tmp_path, {"b.jsonl": [
        {"prompt": p, "response": r, "label": lab, "annotator_id": a} for p, r, lab, a in THUMBS]})
    assert list(frame.columns) == COLUMNS
    # z is split 1:1 (dropped); q's lone up response is kept although it has no partner to pair with
    assert _labels(frame) == {("p", "x"): True, ("p", "y"): False, ("p", "w"): True, ("q", "v"): True}
    w = frame.set_index("completion")
    assert w.loc["w", "agreement"] == pytest.approx(2 / 3, abs=1e-6)
    assert w.loc["w", "weight"] == 1.0 and not w["is_chat"].any()
    assert build.counts["unpaired"] == 4 and build.counts["unpaired_desirable"] == 3
    assert build.counts["unpaired_ties"] == 1
    # the split of every item is its prompt's split in the pairs/prompts tables
    prompts = pd.read_parquet(build.prompts).set_index("prompt")["split"]
    assert all(prompts[p] == s for p, s in zip(frame["prompt"], frame["split"], strict=True))
    for split in ("train", "validation", "test"):
        part = pq.read_table(build.split_files["unpaired"][split]).to_pandas()
        assert set(part["split"]) <= {split} and len(part) == (frame["split"] == split).sum()


def test_low_agreement_items_follow_the_pair_policy(tmp_path):
    rows = [{"prompt": p, "response": r, "label": lab, "annotator_id": a} for p, r, lab, a in THUMBS]
    _, dropped = _build(tmp_path / "drop", {"b.jsonl": rows}, min_agreement=0.7, low_agreement="drop")
    assert ("p", "w") not in _labels(dropped)  # agreement 2/3 < 0.7
    _, kept = _build(tmp_path / "down", {"b.jsonl": rows}, min_agreement=0.7, low_agreement="downweight",
                     low_agreement_weight=0.5)
    assert kept.set_index("completion").loc["w", "weight"] == 0.5


def test_ratings_above_and_below_the_thresholds(tmp_path):
    rows = [("hi", 5, "a"), ("hi", 4, "b"), ("mid", 3, "a"), ("lo", 1, "a"), ("lo", 2, "b"), ("edge", 4, "c")]
    build, frame = _build(tmp_path, {"rating.jsonl": [
        {"prompt": "p", "response": r, "score": s, "annotator_id": a} for r, s, a in rows]})
    assert _labels(frame) == {("p", "hi"): True, ("p", "lo"): False, ("p", "edge"): True}
    assert build.counts["unpaired_votes_from_ratings"] == 5  # every rating row of a decided response votes
    _, strict = _build(tmp_path / "strict", {"rating.jsonl": [
        {"prompt": "p", "response": r, "score": s, "annotator_id": a} for r, s, a in rows]},
        rating_desirable_min=4.5, rating_undesirable_max=1.0)
    # hi's mean 4.5 is at the threshold (counts), edge's 4 below it; lo's mean 1.5 is above 1.0
    assert _labels(strict) == {("p", "hi"): True}


def test_comparisons_vote_chosen_up_and_rejected_down(tmp_path):
    votes = [{"prompt": "p", "response_a": "A", "response_b": "B", "choice": "a", "annotator_id": "u"},
             {"prompt": "p", "response_a": "B", "response_b": "C", "choice": "a", "annotator_id": "u"},
             {"prompt": "q", "response_a": "D", "response_b": "E", "choice": "tie", "annotator_id": "u"}]
    build, frame = _build(tmp_path, {"pairwise.jsonl": votes})
    # B wins once and loses once: no definite label; the tie says nothing about D or E
    assert _labels(frame) == {("p", "A"): True, ("p", "C"): False}
    _, only_thumbs = _build(tmp_path / "t", {"pairwise.jsonl": votes}, unpaired_sources=["binary"])
    assert only_thumbs.empty and list(only_thumbs.columns) == COLUMNS


def test_sources_add_up_and_the_digest_tracks_the_unpaired_set(tmp_path):
    files = {"b.jsonl": [{"prompt": "p", "response": "A", "label": False, "annotator_id": "t"}],
             "pairwise.jsonl": [{"prompt": "p", "response_a": "A", "response_b": "B", "choice": "a",
                                 "annotator_id": "u"}]}
    both, frame = _build(tmp_path / "both", files)
    assert "A" not in set(frame["completion"])  # one vote up (pair) and one down (thumbs): a tie
    comparisons_only, frame2 = _build(tmp_path / "c", files, unpaired_sources=["comparisons"])
    assert _labels(frame2) == {("p", "A"): True, ("p", "B"): False}
    assert both.digests["pairs"] == comparisons_only.digests["pairs"]
    assert both.digest != comparisons_only.digest  # the unpaired table is part of the version
    again, _ = _build(tmp_path / "again", files)
    assert again.digest == both.digest


def test_rating_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match="rating_undesirable_max"):
        PreferenceSettings(rating_desirable_min=3.0, rating_undesirable_max=3.0)
