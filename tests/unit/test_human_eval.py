"""Human evaluation sheets: blinding, unblinding against hand-worked votes, the human gate, and a
sheet filled by the demo's simulated annotators brought back through the real ingest."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from tasks.data.handoff import read_validated_kind
from tasks.data.landing import ingest
from tasks.data.settings import IngestSettings, PreferenceSettings
from tasks.demo.human_sheet import fill_sheet
from tasks.demo.settings import SimulatorSettings
from tasks.evaluation.human import (
    SHEET_COLUMNS,
    SOURCE_PREFIX,
    SheetKey,
    await_people,
    blinded_items,
    human_results,
    human_verdict,
    load_keys,
    unblind,
    write_sheet,
)
from tasks.evaluation.settings import GateSettings

PROMPTS = [f"prompt {i}" for i in range(40)] + [[{"role": "user", "content": "a chat prompt"}]]
FIRST = [f"first answer {i}" for i in range(41)]
SECOND = [f"second answer {i}" for i in range(41)]


def _key(a_is: dict, first="1", second="2") -> SheetKey:
    return SheetKey(sheet_id="s1", model="m-policy", first_version=first, second_version=second, first_ref="champion",
                    second_ref="challenger", created_at="2026-01-01T00:00:00+00:00", seed=0, a_is=a_is)


def test_sheet_is_blinded_randomised_and_seeded():
    frame, a_is, left_out = blinded_items(PROMPTS, FIRST, SECOND, seed=3, sheet_id="s1")
    assert list(frame.columns) == SHEET_COLUMNS and len(frame) == 41
    assert (frame["source"] == SOURCE_PREFIX + "s1").all() and (frame["choice"] == "").all()
    assert set(frame["conversation_id"]) == set(a_is) and frame["conversation_id"].is_unique
    # both sides hold both versions, and the rows are not in prompt order
    assert 5 < sum(v == "first" for v in a_is.values()) < 36
    assert frame["prompt"].tolist() != [p if isinstance(p, str) else json.dumps(p) for p in PROMPTS]
    for row in frame.to_dict("records"):  # the key says which answer is which
        i = FIRST.index(row["response_a"]) if a_is[row["conversation_id"]] == "first" else SECOND.index(row["response_a"])
        expected_b = SECOND[i] if a_is[row["conversation_id"]] == "first" else FIRST[i]
        assert row["response_b"] == expected_b
    assert json.loads(frame.loc[frame["prompt"].str.startswith("["), "prompt"].iloc[0])[0]["role"] == "user"
    again, _, _ = blinded_items(PROMPTS, FIRST, SECOND, seed=3, sheet_id="s1")
    other, _, _ = blinded_items(PROMPTS, FIRST, SECOND, seed=4, sheet_id="s1")
    assert again.equals(frame) and not other.equals(frame)
    assert left_out == {"identical": 0, "empty": 0}
    with pytest.raises(ValueError, match="same positive number"):
        blinded_items(PROMPTS, FIRST[:-1], SECOND, seed=0, sheet_id="s1")


def test_identical_and_blank_answers_stay_off_the_sheet():
    frame, a_is, left_out = blinded_items(["p1", "p2", "p3", "p4"], ["same  answer", "x", "", "y"],
                                          ["same answer", "z", "w", "y2"], seed=0, sheet_id="s1")
    assert sorted(frame["prompt"]) == ["p2", "p4"] and len(a_is) == 2
    assert left_out == {"identical": 1, "empty": 1}


def test_unblind_against_hand_worked_votes():
    key = _key({"i1": "first", "i2": "second", "i3": "first"})
    votes = pd.DataFrame([
        ("i1", "b", "ann1"), ("i1", "b", "ann2"),   # first shown as a; b = second wins twice
        ("i2", "a", "ann1"), ("i2", "b", "ann2"),   # second shown as a: one win, one loss -> item 0.5
        ("i3", "tie", "ann3"),                       # a tie counts half
        ("other", "a", "ann1"),                      # not an item of this sheet: ignored
    ], columns=["conversation_id", "choice", "annotator_id"])
    result = unblind(votes, key)
    w = result.win_rate
    # per-item means 1, 0.5, 0.5 -> rate 2/3 over 3 items
    assert w.rate == pytest.approx(2 / 3) and w.units == 3
    assert result.votes == 5 and result.annotators == 3
    assert result.agreement == pytest.approx(1 / 2)  # i1: one agreeing pair, i2: one disagreeing pair
    assert 0 < w.lower < 2 / 3 < w.upper < 1
    tags = result.tags()
    assert tags["alignflow.human.vs_version"] == "1" and tags["alignflow.human.items"] == "3"
    assert unblind(votes[votes["conversation_id"] == "other"], key) is None


def test_human_verdict_promotes_only_a_clear_reliable_win_over_the_current_champion():
    key = _key({f"i{i}": "first" if i % 2 else "second" for i in range(30)})
    wins = pd.DataFrame([(f"i{i}", "b" if i % 2 else "a", a) for i in range(30) for a in ("x", "y")],
                        columns=["conversation_id", "choice", "annotator_id"])
    result = unblind(wins, key)
    assert result.win_rate.rate == 1.0 and result.agreement == 1.0
    gate, prefs = GateSettings(judge="human", min_win_rate_lower_bound=0.5), PreferenceSettings()
    passed, reasons = human_verdict(result, "1", gate, prefs)
    assert passed and "Promoted by people" in reasons[0] and "30 items" in reasons[1]
    assert not human_verdict(result, "3", gate, prefs)[0]  # the champion moved since the sheet
    assert not human_verdict(result, "2", gate, prefs)[0]  # already the champion
    split = wins.assign(choice=[("b" if i % 2 else "a") if a == "x" else ("a" if i % 2 else "b")
                                for i in range(30) for a in ("x", "y")])
    noisy = unblind(split, key)
    assert noisy.agreement == 0.0
    passed, reasons = human_verdict(noisy, "1", gate, prefs)
    assert not passed and "disagree" in reasons[0]
    passed, reasons = human_verdict(unblind(wins.iloc[:4], key), "1", gate, prefs)
    assert not passed and "misses gate.min_win_rate_lower_bound" in reasons[0]  # 2 items: too few to be sure


def test_await_people_holds_a_round_candidate_under_the_human_judge():
    class Cfg:
        gate = GateSettings(judge="human")

    held = await_people(Cfg(), {"passed": True, "reasons": ["all rules pass"]})
    assert held["passed"] is False and "eval-export" in held["reasons"][0] and held["reasons"][1] == "all rules pass"
    Cfg.gate = GateSettings()
    assert await_people(Cfg(), {"passed": True, "reasons": []})["passed"] is True


def test_simulated_annotators_fill_a_sheet_that_comes_back_through_ingest(tmp_path):
    positive = [f"a wonderful, great and lovely film {i}" for i in range(30)]
    negative = [f"an awful, terrible and boring film {i}" for i in range(30)]
    prompts = [f"review {i}:" for i in range(30)]
    frame, a_is, _ = blinded_items(prompts, negative, positive, seed=0, sheet_id="s1")
    key = _key(a_is)
    home = tmp_path / "home"
    csv_path, jsonl_path, key_path = write_sheet(frame, key, tmp_path / "out", home)
    assert load_keys(home)["s1"] == key and "first" not in csv_path.read_text()  # the key stays in the home
    sheet = pd.read_csv(csv_path, keep_default_na=False)
    filled = fill_sheet(sheet, SimulatorSettings(), seed=1)
    assert len(filled) == 3 * len(sheet) and set(filled["choice"]) <= {"a", "b", "tie"}
    landing = tmp_path / "landing"
    landing.mkdir()
    filled.to_csv(landing / "filled.csv", index=False)
    ingest(IngestSettings(landing_dir=str(landing), quarantine_max_share=0.0), tmp_path / "store")
    pairwise = read_validated_kind(tmp_path / "store" / "validated", "pairwise")
    assert len(pairwise) == len(filled) and set(pairwise["annotator_id"]) <= {a.id for a in SimulatorSettings().annotators}
    (result,) = human_results(home, pairwise)
    # independent count: each vote for the positive (second) answer is a win
    per_item = {}
    for row in filled.to_dict("records"):
        second_is_a = a_is[row["conversation_id"]] == "second"
        won = 0.5 if row["choice"] == "tie" else float((row["choice"] == "a") == second_is_a)
        per_item.setdefault(row["conversation_id"], []).append(won)
    expected = sum(sum(v) / len(v) for v in per_item.values()) / len(per_item)
    assert result.win_rate.rate == pytest.approx(expected) and result.win_rate.units == 30
    assert result.win_rate.lower > 0.6  # the careful annotators clearly prefer the positive answers
    assert result.votes == len(filled) and result.annotators >= 3 and not math.isnan(result.agreement)


def test_a_sheet_verdict_is_taken_once_per_set_of_votes(tmp_path):
    from tasks.evaluation.human import _decided, read_prompts

    key = _key({"i1": "first"})
    result = unblind(pd.DataFrame([("i1", "b", "x")], columns=["conversation_id", "choice", "annotator_id"]), key)
    assert not _decided({}, result)
    assert _decided({"alignflow.human.gate_sheet": "s1", "alignflow.human.gate": "passed",
                     "alignflow.human.gate_votes": "99"}, result)  # a promotion is never undone
    failed = {"alignflow.human.gate_sheet": "s1", "alignflow.human.gate": "failed", "alignflow.human.gate_votes": "1"}
    assert _decided(failed, result)
    assert not _decided({**failed, "alignflow.human.gate_votes": "0"}, result)  # new votes: ask again
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": ["plain", json.dumps([{"role": "user", "content": "hi"}])],
                  "is_chat": ["False", "True"]}).to_csv(csv, index=False)
    assert read_prompts(csv) == ["plain", [{"role": "user", "content": "hi"}]]
    with pytest.raises(ValueError, match="'prompt' column"):
        pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "bad.csv", index=False)
        read_prompts(tmp_path / "bad.csv")
