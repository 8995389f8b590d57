"""Preference builder: kinds -> pairs against hand-worked examples, votes, annotators, splits, digests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.data.landing import ingest
from tasks.data.preferences import EmptyPreferenceDataset, build_preferences, load_pairs
from tasks.data.settings import IngestSettings, PreferenceSettings


def _build(tmp_path: Path, files: dict[str, list[dict]], settings: PreferenceSettings | None = None, name="ds"):
    """Write each list of rows as a landing file, ingest it, build; return (build, pairs frame)."""
    landing = tmp_path / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    for fname, rows in files.items():
        (landing / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(IngestSettings(landing_dir=str(landing), quarantine_max_share=0.0), tmp_path / "store")
    build = build_preferences(tmp_path / "store" / "validated", tmp_path / name,
                              settings or PreferenceSettings(min_agreement=0.0))
    return build, pd.read_parquet(build.pairs)


def _triples(pairs: pd.DataFrame) -> set[tuple]:
    return set(zip(pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True))


def test_ranking_to_pairs(tmp_path):
    build, pairs = _build(tmp_path, {"r.jsonl": [
        {"prompt": "p", "responses": ["A", "B", "C"], "ranking": [2, 0, 1], "annotator_id": "ann"}]})
    assert _triples(pairs) == {("p", "C", "A"), ("p", "C", "B"), ("p", "A", "B")}
    assert pairs["weight"].tolist() == [1.0] * 3 and pairs["agreement"].tolist() == [1.0] * 3
    assert pairs["annotators"].map(list).tolist() == [["ann"]] * 3
    assert pairs["pair_id"].str.fullmatch("[0-9a-f]{16}").all() and pairs["pair_id"].is_unique


def test_ratings_to_pairs_by_score_gap(tmp_path):
    rows = [("r1", 5, "a"), ("r1", 2, "b"), ("r2", 1, "a"), ("r2", 3, "b"), ("r3", 4, "c")]
    build, pairs = _build(tmp_path, {"rating.jsonl": [
        {"prompt": "p", "response": r, "score": s, "annotator_id": a} for r, s, a in rows]})
    # means: r1 3.5, r2 2.0, r3 4.0 -> gaps >= 1: r1>r2 (1.5), r3>r2 (2.0); r3 vs r1 is 0.5
    got = {(c, r): (w, ag, list(ann)) for c, r, w, ag, ann in
           zip(pairs["chosen"], pairs["rejected"], pairs["weight"], pairs["agreement"], pairs["annotators"], strict=True)}
    # r1 vs r2 individual ratings: (5,1) (5,3) (2,1) win, (2,3) loses -> 3/4
    assert got == {("r1", "r2"): (1.0, 0.75, ["a", "b"]), ("r3", "r2"): (1.0, 1.0, ["a", "b", "c"])}
    _, wide = _build(tmp_path / "gap", {"rating.jsonl": [
        {"prompt": "p", "response": r, "score": s, "annotator_id": a} for r, s, a in rows]},
        PreferenceSettings(min_agreement=0.0, rating_min_gap=2.0))
    assert _triples(wide) == {("p", "r3", "r2")}


def test_thumbs_to_pairs_within_a_prompt(tmp_path):
    rows = [("p", "x", True, "a"), ("p", "y", False, "b"), ("p", "z", True, "a"), ("p", "z", False, "b"),
            ("p", "w", True, "a"), ("p", "w", True, "c"), ("p", "w", False, "b"), ("q", "v", True, "a")]
    build, pairs = _build(tmp_path, {"b.jsonl": [
        {"prompt": p, "response": r, "label": lab, "annotator_id": a} for p, r, lab, a in rows]})
    got = {(c, r): (round(ag, 4), list(ann)) for c, r, ag, ann in
           zip(pairs["chosen"], pairs["rejected"], pairs["agreement"], pairs["annotators"], strict=True)}
    # z is split 1:1 (no pair), q has no down response; w's up share is 2/3 -> 0.5 + 0.5 * (2/3 - 0)
    assert got == {("x", "y"): (1.0, ["a", "b"]), ("w", "y"): (0.8333, ["a", "b", "c"])}
    _, balanced = _build(tmp_path / "bal", {"b.jsonl": [
        {"prompt": p, "response": r, "label": lab, "annotator_id": a} for p, r, lab, a in rows]},
        PreferenceSettings(min_agreement=0.0, binary_pairing="balanced"))
    assert len(balanced) == 1


def _votes(prompt, a, b, choices, start=0):
    return [{"prompt": prompt, "response_a": a, "response_b": b, "choice": c, "annotator_id": f"ann{start + i}"}
            for i, c in enumerate(choices)]


def test_vote_aggregation_agreement_ties_and_low_agreement(tmp_path):
    files = {"v.jsonl": _votes("p1", "A", "B", ["a", "a", "b"])            # A wins 2:1
             + _votes("p2", "C", "D", ["b"]) + _votes("p2", "D", "C", ["a"], 1)  # order-swapped, same judgement
             + _votes("p3", "E", "F", ["a", "b"])                           # 1:1 is a tie
             + _votes("p4", "G", "H", ["tie", "tie", "a"])                  # a tie by majority
             + _votes("p5", "I", "J", ["a", "a", "a", "b", "b"])}           # agreement 0.6
    _, pairs = _build(tmp_path, files)
    got = {c + r: (w, round(ag, 6), len(ann)) for c, r, w, ag, ann in
           zip(pairs["chosen"], pairs["rejected"], pairs["weight"], pairs["agreement"], pairs["annotators"], strict=True)}
    assert got == {"AB": (1.0, 0.666667, 3), "DC": (1.0, 1.0, 2), "IJ": (1.0, 0.6, 5)}
    build, kept = _build(tmp_path / "keep", files, PreferenceSettings(ties="keep", min_agreement=0.65,
                                                                      low_agreement="downweight", low_agreement_weight=0.5))
    got = {c + r: (w, round(ag, 6)) for c, r, w, ag in zip(kept["chosen"], kept["rejected"], kept["weight"],
                                                             kept["agreement"], strict=True)}
    assert got == {"AB": (1.0, 0.666667), "DC": (1.0, 1.0), "IJ": (0.5, 0.6),
                   "EF": (0.25, 0.5), "FE": (0.25, 0.5), "GH": (0.5, 0.666667), "HG": (0.5, 0.666667)}
    assert build.counts["ties"] == 2 and build.counts["low_agreement"] == 3
    _, dropped = _build(tmp_path / "drop", files, PreferenceSettings(min_agreement=0.65, low_agreement="drop"))
    assert set(dropped["chosen"] + dropped["rejected"]) == {"AB", "DC"}


def simulate_annotators(n_items=400, per_item=4, seed=0):
    """Five annotators who prefer the truly better response with probability sigmoid(margin / t)
    (t from 0.3 to 1.0), and one spammer who answers at random."""
    rng = np.random.default_rng(seed)
    temps = {"careful": 0.3, "typical": 0.5, "hasty": 0.7, "noisy": 1.0, "busy": 0.6, "spammer": None}
    names = list(temps)
    rows, truth = [], {}
    for i in range(n_items):
        margin = rng.uniform(0.5, 2.0)
        truth[f"prompt {i}"] = "good"
        for name in rng.choice(names, per_item, replace=False):
            t = temps[name]
            p_correct = 0.5 if t is None else 1 / (1 + np.exp(-margin / t))
            correct = rng.random() < p_correct
            swap = rng.random() < 0.5
            a, b = ("bad", "good") if swap else ("good", "bad")
            choice = ("b" if swap else "a") if correct else ("a" if swap else "b")
            rows.append({"prompt": f"prompt {i}", "response_a": f"{a} answer {i}", "response_b": f"{b} answer {i}",
                         "choice": choice, "annotator_id": str(name)})
    return rows


def test_spammer_is_flagged_and_excluded(tmp_path):
    rows = simulate_annotators()
    build, pairs = _build(tmp_path, {"v.jsonl": rows}, PreferenceSettings(annotator_action="exclude", min_agreement=0))
    card = json.loads(Path(build.card_json).read_text())
    people = {p["annotator"]: p for p in card["annotators"]}
    assert [name for name, p in people.items() if p["flagged"]] == ["spammer"]
    assert people["spammer"]["agreement"] < 0.6 < min(p["agreement"] for n, p in people.items() if n != "spammer")
    assert people["spammer"]["vote_factor"] == 0.0
    assert not any("spammer" in list(a) for a in pairs["annotators"])
    assert pairs["chosen"].str.startswith("good").mean() > 0.9  # the vote recovers the true preference
    build_dw, _ = _build(tmp_path / "dw", {"v.jsonl": rows}, PreferenceSettings(annotator_action="downweight"))
    card_dw = json.loads(Path(build_dw.card_json).read_text())
    assert {p["annotator"]: p["vote_factor"] for p in card_dw["annotators"]}["spammer"] == 0.25


def test_splits_have_no_prompt_leakage_and_are_stable(tmp_path):
    rows = []
    for i in range(600):
        prompt = f"Review number {i}"
        rows += _votes(prompt, f"yes {i}", f"no {i}", ["a"])
        rows += _votes(f"  Review   number {i} ", f"yes {i}", f"maybe {i}", ["b"], 1)  # whitespace variant
    rows += [{"prompt": f"Review number {i}", "response": f"demo {i}"} for i in range(0, 600, 3)]
    build, pairs = _build(tmp_path, {"v.jsonl": rows[:1200], "w.jsonl": rows[1200:]})
    files = build.split_files
    seen: dict[str, str] = {}
    for table in ("pairs", "prompts", "demonstrations"):
        for split, path in files[table].items():
            for prompt in pd.read_parquet(path)["prompt"]:
                assert seen.setdefault(" ".join(prompt.split()), split) == split, f"{prompt!r} in two splits"
    prompts = pd.read_parquet(build.prompts)
    assert len(prompts) == 600 and prompts["prompt_id"].is_unique  # whitespace variants are one prompt
    assert all(p == " ".join(p.split()) or p.startswith(" ") for p in prompts["prompt"])
    share = prompts["split"].value_counts(normalize=True)
    assert abs(share["train"] - 0.8) < 0.06 and abs(share["test"] - 0.1) < 0.04
    assert len(pd.read_parquet(build.demonstrations)) == 200 and build.counts["demonstrations_from"] == "rows"
    again, _ = _build(tmp_path, {}, name="again")
    assert again.digest == build.digest
    assert pd.read_parquet(again.prompts)["split"].tolist() == prompts["split"].tolist()
    salted = build_preferences(tmp_path / "store" / "validated", tmp_path / "salted",
                               PreferenceSettings(split_salt="other", min_agreement=0))
    assert salted.digest != build.digest
    assert len(load_pairs(tmp_path / "ds", split="test")) == build.counts["pairs_test"]


def test_digest_ignores_row_order_and_changes_with_content(tmp_path):
    rows = simulate_annotators(n_items=60, seed=1)
    ratings = [{"prompt": f"prompt {i // 2}", "response": f"r{i}", "score": float(1 + 3 * (i % 2)), "annotator_id": "rater"}
               for i in range(30)]
    a, pairs_a = _build(tmp_path / "a", {"x.jsonl": rows, "y.jsonl": ratings})
    rng = np.random.default_rng(3)
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    b, pairs_b = _build(tmp_path / "b", {"x1.jsonl": shuffled[:100], "x2.jsonl": shuffled[100:],
                                         "y.jsonl": [ratings[i] for i in rng.permutation(len(ratings))]})
    assert a.digest == b.digest and a.digests == b.digests
    assert a.source_digest != b.source_digest  # different input files, same content
    pd.testing.assert_frame_equal(pairs_a.drop(columns="source_digest"), pairs_b.drop(columns="source_digest"))
    again, _ = _build(tmp_path / "a", {}, name="again")
    assert Path(again.pairs).read_bytes() == Path(a.pairs).read_bytes()  # same files: same bytes
    for change in ({"response_a": rows[0]["response_a"] + "!"}, {"annotator_id": "someone"},
                   {"choice": "b" if rows[0]["choice"] == "a" else "a"}):
        changed = [{**rows[0], **change}] + rows[1:]
        c, _ = _build(tmp_path / f"c{next(iter(change))}", {"x.jsonl": changed, "y.jsonl": ratings})
        assert c.digest != a.digest, change
    d, _ = _build(tmp_path / "d", {"x.jsonl": rows, "y.jsonl": ratings[:-1] + [{**ratings[-1], "score": 1.0}]})
    assert d.digest != a.digest and d.digests["prompts"] == a.digests["prompts"]


def test_repeated_exports_and_whitespace_variants_are_deduplicated(tmp_path):
    rows = _votes("p", "Great  movie", "Bad movie", ["a"]) + _votes("p", "Great movie ", "Bad movie", ["a"], 1)
    (tmp_path / "landing").mkdir()
    (tmp_path / "landing" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(IngestSettings(landing_dir=str(tmp_path / "landing")), tmp_path / "store")
    (tmp_path / "landing" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1]))  # re-export
    ingest(IngestSettings(landing_dir=str(tmp_path / "landing")), tmp_path / "store")
    build = build_preferences(tmp_path / "store" / "validated", tmp_path / "ds", PreferenceSettings())
    pairs = pd.read_parquet(build.pairs)
    assert build.counts["duplicate_rows"] == 1 and build.counts["comparisons"] == 2
    assert len(pairs) == 1 and pairs["chosen"].iloc[0] == "Great  movie"  # smallest original of the variants
    assert list(pairs["annotators"].iloc[0]) == ["ann0", "ann1"]
    no_dedup = build_preferences(tmp_path / "store" / "validated", tmp_path / "ds2", PreferenceSettings(dedup_rows=False))
    assert no_dedup.counts["comparisons"] == 3


def test_demonstration_fallback_card_and_empty_build(tmp_path):
    build, pairs = _build(tmp_path, {"v.jsonl": _votes("p", "good", "bad", ["a", "a"])})
    demos = pd.read_parquet(build.demonstrations)
    assert demos[["prompt", "response", "weight"]].values.tolist() == [["p", "good", 1.0]]
    assert build.counts["demonstrations_from"] == "chosen"
    card = json.loads(Path(build.card_json).read_text())
    assert card["digest"] == build.digest and card["lengths_chars"]["chosen"]["max"] == 4.0
    assert "| ann0 | 1 |" in Path(build.card_md).read_text()
    assert list(pairs.columns) == ["prompt", "is_chat", "chosen", "rejected", "pair_id", "weight", "annotators",
                                   "agreement", "split", "source_digest"]
    with pytest.raises(EmptyPreferenceDataset, match="0 preference pairs"):
        _build(tmp_path / "empty", {"v.jsonl": _votes("p", "x", "y", ["tie"])}, PreferenceSettings())
    with pytest.raises(EmptyPreferenceDataset, match="0 preference pairs"):
        build_preferences(tmp_path / "nothing-validated", tmp_path / "none")


def test_validated_hand_off_is_arrow_ipc_and_its_source_digest_follows_content(tmp_path):
    rows = simulate_annotators(n_items=40, seed=4)
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    builds = []
    for name in ("store1", "store2", "store3"):  # the same export ingested afresh: same files, same digest
        if name == "store3":
            changed = [{**rows[0], "prompt": rows[0]["prompt"] + "?"}] + rows[1:]
            (landing / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
        ingest(IngestSettings(landing_dir=str(landing), ledger_path=str(tmp_path / f"{name}.jsonl"),
                              quarantine_max_share=0.0), tmp_path / name)
        builds.append(build_preferences(tmp_path / name / "validated", tmp_path / f"ds-{name}",
                                        PreferenceSettings(min_agreement=0.0)))
    a, b, c = builds
    assert a.source_digest == b.source_digest and a.digest == b.digest
    assert c.source_digest != a.source_digest
    files = list((tmp_path / "store1" / "validated").rglob("*.arrow"))
    assert files and all(p.read_bytes()[:6] == b"ARROW1" for p in files)  # IPC files, memory-mappable


def test_stores_with_parquet_validated_files_still_build_the_same(tmp_path):
    """A store an older version wrote (``validated/<kind>/<batch>.parquet``) builds the same
    dataset; re-ingesting that batch replaces its Parquet file instead of doubling its rows."""
    rows = [{"prompt": f"p{i % 3}", "response_a": f"a{i}", "response_b": f"b{i}", "choice": "ab"[i % 2],
             "annotator_id": f"ann{i % 4}"} for i in range(24)]
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = IngestSettings(landing_dir=str(landing), ledger_path=str(tmp_path / "ledger.jsonl"))
    result = ingest(settings, tmp_path / "store", commit=False)
    arrow = Path(result.validated["pairwise"])
    current = build_preferences(tmp_path / "store" / "validated", tmp_path / "ds-arrow", PreferenceSettings())
    old = arrow.with_suffix(".parquet")
    pq.write_table(pa.ipc.open_file(pa.memory_map(str(arrow))).read_all(), old)
    arrow.unlink()
    older = build_preferences(tmp_path / "store" / "validated", tmp_path / "ds-parquet", PreferenceSettings())
    assert older.digest == current.digest and older.counts == current.counts
    ingest(settings, tmp_path / "store")  # the same batch again, now as IPC
    assert arrow.exists() and not old.exists()
    again = build_preferences(tmp_path / "store" / "validated", tmp_path / "ds-again", PreferenceSettings())
    assert again.digest == current.digest and again.counts == current.counts
