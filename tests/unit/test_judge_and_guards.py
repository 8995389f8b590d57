"""Issue 15 (1, 2): judges you can trust and guards that catch word stuffing and loops.

The judge statistics (Wilson interval, calibration error, agreement with the oracle, per-token
log-likelihood) are checked against independent computations; the gate is checked to refuse an
unreliable reward model's verdict, to say which judge decided, and to fail stuffed or looping text
while passing ordinary text.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from tasks.evaluation import metrics as M
from tasks.evaluation.gate import decide
from tasks.evaluation.report import JudgeAgreement
from tasks.evaluation.settings import GateSettings
from tests.unit.test_gate import judge_accuracy, report, win

# --- statistics against independent computation ---------------------------------------------


@pytest.mark.parametrize("k,n", [(0, 5), (3, 10), (47, 86), (74, 90), (90, 90), (1, 1)])
def test_wilson_interval_matches_scipy(k, n):
    want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert M.wilson_interval(k, n, 0.95) == pytest.approx((want.low, want.high), abs=1e-12)
    want90 = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
    assert M.wilson_interval(k, n, 0.9) == pytest.approx((want90.low, want90.high), abs=1e-12)


def test_preference_accuracy_counts_pairs_and_uses_the_wilson_interval():
    rng = np.random.default_rng(0)
    chosen, rejected = rng.normal(0.3, 1, 90), rng.normal(0, 1, 90)
    acc = M.preference_accuracy(chosen, rejected)
    k = int((chosen > rejected).sum())
    want = binomtest(k, 90).proportion_ci(method="wilson")
    assert acc.n == 90 and acc.accuracy == k / 90
    assert (acc.lower, acc.upper) == pytest.approx((want.low, want.high), abs=1e-12)
    assert acc.mean_margin == pytest.approx(float(np.mean(chosen - rejected)))


def _ece_by_hand(margins, n_bins=10):
    """ECE written out pair by pair: p = 1/(1+e^-m); confidence max(p, 1-p); correct when p > 0.5."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for m in margins:
        p = 1 / (1 + math.exp(-m))
        conf = max(p, 1 - p)
        correct = 1.0 if p > 0.5 else (0.0 if p < 0.5 else 0.5)
        b = min(int((conf - 0.5) / (0.5 / n_bins)), n_bins - 1)
        bins.setdefault(b, []).append((conf, correct))
    n = len(margins)
    return sum(len(v) / n * abs(sum(c for _, c in v) / len(v) - sum(f for f, _ in v) / len(v)) for v in bins.values())


def test_calibration_error_matches_a_pair_by_pair_computation():
    rng = np.random.default_rng(3)
    margins = rng.normal(0.4, 1.5, 200)
    assert M.calibration_ece(margins, np.zeros(200)) == pytest.approx(_ece_by_hand(margins), abs=1e-12)
    # Closed forms: every pair at p = 0.75 and right -> off by 0.25; half of them wrong -> 0.25 again
    # (confidence 0.75, accuracy 0.5); probabilities that say how often they are right -> 0.
    m = math.log(3)
    assert M.calibration_ece([m] * 8, [0.0] * 8) == pytest.approx(0.25)
    assert M.calibration_ece([m] * 4 + [-m] * 4, [0.0] * 8) == pytest.approx(0.25)
    assert M.calibration_ece([50.0] * 6, [0.0] * 6) == pytest.approx(0.0, abs=1e-12)


def test_judge_agreement_counts_oracle_decided_pairs():
    judge_a = [1.0, 2.0, 0.0, 5.0, 1.0, 3.0]
    judge_b = [0.0, 3.0, 1.0, 5.0, 1.0, 1.0]
    oracle_a = [0.9, 0.2, 0.0, 0.8, 0.5, 0.1]
    oracle_b = [0.1, 0.6, 0.7, 0.1, 0.5, 0.4]
    # pair: judge says / oracle says -> agree: a/a 1, b/b 1, b/b 1, tie/a 0.5, (oracle tie: left out), a/b 0
    a = M.judge_agreement(judge_a, judge_b, oracle_a, oracle_b)
    assert (a.n, a.oracle_ties) == (5, 1)
    assert a.rate == pytest.approx(3.5 / 5)
    assert (a.lower, a.upper) == pytest.approx(M.wilson_interval(3.5, 5))
    assert M.judge_agreement([1.0], [0.0], [0.3], [0.3]) is None
    with pytest.raises(ValueError, match="pair up"):
        M.judge_agreement([1.0, 2.0], [0.0], [0.3], [0.3])


def test_token_loglik_pools_tokens():
    # Σ log p over sequences / Σ tokens; an empty response adds nothing
    assert M.token_loglik([-6.0, -2.0, 0.0], [3, 1, 0]) == pytest.approx(-8.0 / 4)
    with pytest.raises(ValueError, match="at least one token"):
        M.token_loglik([0.0], [0])


# --- the gate knows its judge ---------------------------------------------------------------
ORACLE_AND_RM = [win("reward_model", "champion", 0.70, 0.60), win("oracle", "champion", 0.58, 0.51)]


def _win_check(d):
    return next(c for c in d.checks if c.rule == "win_rate")


def test_a_reliable_reward_model_decides_and_its_record_is_stated():
    agree = [JudgeAgreement(opponent="champion", rate=0.81, lower=0.72, upper=0.88, n=90, oracle_ties=10)]
    d = decide(report(wins=ORACLE_AND_RM, agreement=agree), GateSettings(min_judge_accuracy=0.6), has_champion=True)
    c = _win_check(d)
    assert d.passed and c.value == 0.60  # the reward model's lower bound decided
    assert "Judge: the reward model, held-out accuracy 0.800 (CI 0.720–0.880 on 90 pairs" in c.message
    assert "calibration error 0.040" in c.message and "agreeing with the oracle on 81.0% of the 90" in c.message
    assert "clears gate.min_judge_accuracy 0.600" in c.message


def test_an_unreliable_reward_model_gives_way_to_the_oracle():
    weak = [judge_accuracy(0.656, 0.553)]
    d = decide(report(wins=ORACLE_AND_RM, accuracy=weak), GateSettings(min_judge_accuracy=0.6), has_champion=True)
    c = _win_check(d)
    assert d.passed and c.value == 0.51  # the oracle's lower bound, not the reward model's 0.60
    assert "judged by the oracle" in c.message
    assert "Judge: the oracle, because the reward model is not a trusted judge" in c.message
    assert "its lower bound 0.553 misses gate.min_judge_accuracy 0.600" in c.message
    assert "win rate 0.700, lower bound 0.600" in c.message  # the overruled verdict is still shown
    assert c.message in d.reasons
    # The oracle's verdict counts both ways: the reward model cannot rescue a candidate the oracle rejects.
    rm_only_wins = [win("reward_model", "champion", 0.80, 0.70), win("oracle", "champion", 0.52, 0.42)]
    refused = decide(report(wins=rm_only_wins, accuracy=weak), GateSettings(), has_champion=True)
    assert refused.failed_rules() == ["win_rate"] and _win_check(refused).value == 0.42


def test_without_an_oracle_an_unreliable_reward_model_cannot_promote():
    rm_only = [win("reward_model", "champion", 0.85, 0.77)]
    for accuracy, why in (([judge_accuracy(0.6, 0.5)], "its lower bound 0.500 misses"),
                          ([], "was not measured")):
        d = decide(report(wins=rm_only, accuracy=accuracy), GateSettings(min_judge_accuracy=0.6), has_champion=True)
        c = _win_check(d)
        assert d.failed_rules() == ["win_rate"] and c.value is None
        assert c.message.startswith("No trusted judge") and why in c.message
        assert "its verdict alone does not promote" in c.message and c.message in d.reasons
    trusting = decide(report(wins=rm_only, accuracy=[]), GateSettings(min_judge_accuracy=None), has_champion=True)
    assert trusting.passed and "not checked (gate.min_judge_accuracy is unset)" in _win_check(trusting).message


def test_the_oracle_as_configured_judge_ignores_the_reward_model_record():
    d = decide(report(wins=ORACLE_AND_RM, accuracy=[]), GateSettings(judge="oracle"), has_champion=True)
    assert d.passed and _win_check(d).value == 0.51 and "Judge: the oracle (gate.judge)." in _win_check(d).message


# --- guards against word stuffing and loops -------------------------------------------------
NORMAL = [
    "a quiet film about two brothers who run a small farm in the hills.",
    "the acting is fine, though the second half drags and the ending feels rushed.",
    "i liked the music and the way the city is shot at night.",
    "not the director's best work, but the cast makes it worth a look.",
    "the story follows a young teacher who moves to a new town.",
    "some scenes are funny, others fall flat; overall a decent evening.",
]
OTHER_NORMAL = [
    "it is a warm story with a strong lead and a clever script.",
    "the plot is thin but the photography is lovely to watch.",
    "a long movie that never quite decides what it wants to be.",
    "the jokes land more often than not and the pace is brisk.",
    "she plays the mother with real feeling, and the kids are good too.",
    "the book was better, yet this version has its moments.",
]
STUFFED = [
    "a good movie with the best thing that's a good movie with a very good movie with the best time in the best time.",
    "great great movie, the best movie, a great movie with the best movie and the best great movie.",
    "the best film with the best actors and the best film with the best story and the best film.",
    "a good movie with a good story and a good movie with a good cast and a good movie.",
    "wonderful wonderful film, the best best film, a wonderful film with the best film.",
    "the best time in the best movie with the best time in the best movie with the best time.",
]


def _text_stats(texts: list[str]) -> dict:
    return {"distinct_2": M.distinct_n(texts, 2), "repetition_rate": M.repetition_rate(texts),
            "repeated_trigram_rate": M.repetition_rate(texts, 3)}


def test_windowed_distinct_n_averages_blocks_of_responses_by_hand():
    texts = ["a b", "a b", "c d", "c d", "e f"]
    # blocks of 2: [0:2], [2:4] and the last ending at the end, [3:5]: 1/2, 1/2 and 2/2 unique bigrams
    assert M.windowed_distinct_n(texts, 2, 2) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert M.windowed_distinct_n(texts[:4], 2, 2) == pytest.approx(0.5)  # an exact multiple: no extra block
    assert M.windowed_distinct_n(texts, 2, 5) == M.windowed_distinct_n(texts, 2, None) == M.distinct_n(texts, 2) == 0.6
    # the same kind of text over ten times the prompts: pooled distinct-2 falls, the windowed one keeps its scale
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(30)]
    many = [" ".join(rng.choice(words, 6)) for _ in range(2000)]
    assert M.distinct_n(many, 2) < 0.5 * M.distinct_n(many[:200], 2)
    assert M.windowed_distinct_n(many, 2, 200) == pytest.approx(M.distinct_n(many[:200], 2), abs=0.03)


def test_stuffed_and_looping_text_fails_the_guards_and_normal_text_passes():
    demo_like = GateSettings(min_distinct2_ratio=0.8, max_repeated_trigram_increase=0.05, max_length_change=0.5)
    reference = _text_stats(NORMAL)
    normal = decide(report(candidate=_text_stats(OTHER_NORMAL), reference=reference), demo_like, has_champion=True)
    assert normal.passed, normal.reasons
    stuffed = decide(report(candidate=_text_stats(STUFFED), reference=reference), demo_like, has_champion=True)
    assert {"distinct2_collapse", "repeated_trigrams"} <= set(stuffed.failed_rules())
    msg = next(c.message for c in stuffed.checks if c.rule == "repeated_trigrams")
    assert "beyond the allowed +5.0 (loops or stuffed phrases)" in msg
    loop = ["the movie is great and the movie is great and the movie is great and the movie is great."] * 3
    looping = decide(report(candidate=_text_stats(loop), reference=reference), demo_like, has_champion=True)
    assert {"distinct2_collapse", "repetition", "repeated_trigrams"} <= set(looping.failed_rules())


def test_fluency_and_length_guards():
    s = GateSettings(max_fluency_drop=1.0, max_length_change=0.5)
    ok = decide(report(candidate={"fluency": -3.6}, reference={"fluency": -3.0}), s, has_champion=True)
    assert ok.passed
    salad = decide(report(candidate={"fluency": -4.5}, reference={"fluency": -3.0}), s, has_champion=True)
    assert salad.failed_rules() == ["fluency"]
    assert "a fall of 1.50, beyond the allowed 1.00 (text the base model finds unlikely" in salad.reasons[1]
    unmeasured = decide(report(candidate={"fluency": None}), s, has_champion=True)
    assert unmeasured.failed_rules() == ["fluency"] and "was not measured" in unmeasured.reasons[1]
    grown = decide(report(length_change=0.8), s, has_champion=True)
    assert grown.failed_rules() == ["length_change"]
    off = GateSettings(max_fluency_drop=None, max_repeated_trigram_increase=None)
    assert {c.rule for c in decide(report(), off, has_champion=True).checks}.isdisjoint({"fluency", "repeated_trigrams"})
