"""Promotion-gate decisions on constructed evaluation reports."""

from __future__ import annotations

import math

import pytest

from tasks.evaluation.gate import GateDecision, decide
from tasks.evaluation.metrics import WinRate
from tasks.evaluation.report import AccuracyResult, EvalReport, ModelEval
from tasks.evaluation.settings import GateSettings

RULES = {"win_rate", "kl_budget", "malformed_share", "malformed_increase", "distinct2_collapse", "repetition",
         "repeated_trigrams", "fluency"}


def model(role: str, **kw) -> ModelEval:
    base = dict(role=role, path=f"/models/{role}", reward_mean=0.1, oracle_mean=0.2, kl=0.0, kl_se=0.0,
                length={"mean": 20.0}, distinct_1=0.3, distinct_2=0.55, repetition_rate=0.05,
                repeated_trigram_rate=0.02, fluency=-3.0, malformed_share=0.01, eos_share=0.2)
    return ModelEval(**{**base, **kw})


def win(judge: str, opponent: str, rate: float, lower: float) -> WinRate:
    return WinRate(judge=judge, opponent=opponent, rate=rate, lower=lower, upper=min(1.0, 2 * rate - lower),
                         wins=60, ties=5, losses=35, units=100, confidence=0.95)


def judge_accuracy(accuracy: float = 0.80, lower: float = 0.72, n: int = 90) -> AccuracyResult:
    """The reward model's held-out accuracy (default: a judge that clears the 0.6 floor)."""
    return AccuracyResult(judge="reward_model", accuracy=accuracy, lower=lower, upper=min(1.0, 2 * accuracy - lower),
                          mean_margin=0.5, ece=0.04, n=n)


def report(*, candidate: dict | None = None, reference: dict | None = None, wins: list | None = None,
           champion_is_reference: bool = False, length_change: float = 0.05,
           accuracy: list | None = None, agreement: list | None = None) -> EvalReport:
    cand = {"kl": 5.0, "kl_se": 0.4, "malformed_share": 0.02, "distinct_2": 0.50, **(candidate or {})}
    return EvalReport(
        candidate=model("candidate", **cand), champion=model("champion", kl=3.0), reference=model("reference",
                                                                                                 **(reference or {})),
        champion_is_reference=champion_is_reference,
        win_rates=wins if wins is not None else [win("reward_model", "champion", 0.62, 0.55),
                                                 win("reward_model", "reference", 0.70, 0.61),
                                                 win("oracle", "champion", 0.58, 0.51),
                                                 win("oracle", "reference", 0.66, 0.57)],
        preference_accuracy=accuracy if accuracy is not None else [judge_accuracy()],
        judge_agreement=agreement or [],
        length_drift={"mean_diff": 1.0, "relative_change": length_change},
        num_prompts=100, samples_per_prompt=1, num_pairs=50, seed=0,
    )


def test_a_good_candidate_passes_and_says_why():
    d = decide(report(), GateSettings(), has_champion=True)
    assert d.passed and {c.rule for c in d.checks} == RULES and all(c.passed for c in d.checks)
    assert d.reasons[0] == "Promoted: all 8 rules passed."
    win_msg = next(c.message for c in d.checks if c.rule == "win_rate")
    assert "champion" in win_msg and "0.550" in win_msg and "clears the threshold 0.500" in win_msg
    assert GateDecision.model_validate_json(d.model_dump_json()) == d


@pytest.mark.parametrize("rule,kwargs,settings", [
    # The point estimate 0.56 beats the champion but the lower bound does not clear 0.5.
    ("win_rate", {"wins": [win("reward_model", "champion", 0.56, 0.46)]}, {}),
    ("kl_budget", {"candidate": {"kl": 31.0}}, {}),
    ("malformed_share", {"candidate": {"malformed_share": 0.15}, "reference": {"malformed_share": 0.12}}, {}),
    ("malformed_increase", {"candidate": {"malformed_share": 0.08}, "reference": {"malformed_share": 0.01}}, {}),
    ("distinct2_collapse", {"candidate": {"distinct_2": 0.30}}, {}),  # floor 0.6 * 0.55 = 0.33
    ("repetition", {"candidate": {"repetition_rate": 0.6}}, {}),
    ("length_change", {"length_change": 0.8}, {"max_length_change": 0.5}),
])
def test_each_rule_fails_on_its_own(rule, kwargs, settings):
    d = decide(report(**kwargs), GateSettings(**settings), has_champion=True)
    assert not d.passed
    assert d.failed_rules() == [rule]
    assert d.reasons[0].startswith("Not promoted: 1 of") and rule in d.reasons[0]
    assert d.reasons[1] == next(c.message for c in d.checks if c.rule == rule)


def test_first_candidate_is_compared_with_the_base_model():
    wins = [win("reward_model", "champion", 0.52, 0.42), win("reward_model", "reference", 0.65, 0.56)]
    first = decide(report(wins=wins, champion_is_reference=True), GateSettings(), has_champion=False)
    assert first.passed
    msg = next(c.message for c in first.checks if c.rule == "win_rate")
    assert "base model" in msg and "0.560" in msg
    # With a champion the same numbers are judged against the champion, and fail.
    later = decide(report(wins=wins), GateSettings(), has_champion=True)
    assert later.failed_rules() == ["win_rate"]


def test_oracle_judge_and_missing_evidence():
    passed = decide(report(), GateSettings(judge="oracle"), has_champion=True)
    assert passed.passed and "oracle" in passed.checks[0].message
    missing = decide(report(wins=[win("reward_model", "champion", 0.7, 0.6)]), GateSettings(judge="oracle"),
                     has_champion=True)
    assert missing.failed_rules() == ["win_rate"] and "No win rate" in missing.reasons[1]
    no_kl = decide(report(candidate={"kl": math.nan}), GateSettings(), has_champion=True)
    assert no_kl.failed_rules() == ["kl_budget"]
    unlimited = decide(report(candidate={"kl": 1e6}), GateSettings(max_kl=None), has_champion=True)
    assert unlimited.passed


def test_thresholds_are_configurable():
    strict = decide(report(), GateSettings(min_win_rate_lower_bound=0.6), has_champion=True)
    assert strict.failed_rules() == ["win_rate"]
    loose = decide(report(candidate={"kl": 31.0}), GateSettings(max_kl=40.0), has_champion=True)
    assert loose.passed


def test_several_failures_are_all_reported():
    d = decide(report(candidate={"kl": 40.0, "repetition_rate": 0.9}), GateSettings(), has_champion=True)
    assert set(d.failed_rules()) == {"kl_budget", "repetition"} and len(d.reasons) == 3


def test_a_report_without_the_champion_is_refused_when_one_exists():
    with pytest.raises(ValueError, match="re-run the evaluation with the champion"):
        decide(report(champion_is_reference=True), GateSettings(), has_champion=True)


def test_greedy_loops_rule_compares_the_looping_share_with_the_reference():
    """Issue 15 point 2: the candidate's greedy output may loop at most this many points more
    often than the base model's; the rule is off unless configured."""
    base = {"greedy_looping_share": 0.47, "greedy_seq_rep3": 0.213}
    s = GateSettings(max_greedy_loop_increase=0.05)
    close = decide(report(candidate={"greedy_looping_share": 0.50, "greedy_seq_rep3": 0.22}, reference=base), s,
                   has_champion=True)
    assert close.passed and "greedy_loops" in {c.rule for c in close.checks}
    check = next(c for c in close.checks if c.rule == "greedy_loops")
    assert check.value == pytest.approx(0.03) and check.threshold == 0.05
    assert "47.0% (reference) to 50.0%" in check.message and "+3.0 points" in check.message

    loops = decide(report(candidate={"greedy_looping_share": 0.69, "greedy_seq_rep3": 0.31}, reference=base), s,
                   has_champion=True)
    assert loops.failed_rules() == ["greedy_loops"]
    assert loops.reasons[1] == ("The share of greedy responses that loop went from 47.0% (reference) to 69.0% (mean "
                                "seq-rep-3 0.213 to 0.310), +22.0 points, beyond the allowed +5.0 (the model's most "
                                "likely text repeats itself).")
    # the same report passes with the rule off (the default) or a looser threshold
    assert decide(report(candidate={"greedy_looping_share": 0.69}, reference=base), GateSettings(),
                  has_champion=True).passed
    assert decide(report(candidate={"greedy_looping_share": 0.69}, reference=base),
                  GateSettings(max_greedy_loop_increase=0.25), has_champion=True).passed
    # looping less than the base model is no problem
    assert decide(report(candidate={"greedy_looping_share": 0.10}, reference=base), s, has_champion=True).passed


def test_greedy_loops_rule_states_the_prompts_and_the_rises_standard_error():
    """With ``evaluation.greedy_splits`` the report says over how many prompts the shares were
    measured and the rise's paired standard error: the reason gives both, the verdict stays the
    threshold's."""
    base = {"greedy_looping_share": 0.466, "greedy_seq_rep3": 0.213}
    r = report(candidate={"greedy_looping_share": 0.534, "greedy_seq_rep3": 0.2}, reference=base)
    r = r.model_copy(update={"num_greedy_prompts": 220, "greedy_loop_rise_se": 0.0312})
    d = decide(r, GateSettings(max_greedy_loop_increase=0.05), has_champion=True)
    assert d.failed_rules() == ["greedy_loops"]
    assert d.reasons[1] == ("The share of greedy responses that loop went from 46.6% (reference) to 53.4% of 220 "
                            "held-out prompts (mean seq-rep-3 0.213 to 0.200), +6.8 points (standard error 3.1, "
                            "paired per prompt), beyond the allowed +5.0 (the model's most likely text repeats itself).")
    ok = decide(r, GateSettings(max_greedy_loop_increase=0.07), has_champion=True)
    assert ok.passed and "of 220 held-out prompts" in next(c.message for c in ok.checks if c.rule == "greedy_loops")


@pytest.mark.parametrize("candidate,reference", [({}, {}),  # greedy decoding off: not measured
                                                 ({"greedy_looping_share": math.nan}, {"greedy_looping_share": 0.4}),
                                                 ({"greedy_looping_share": 0.4}, {})])
def test_greedy_loops_rule_fails_without_the_figures(candidate, reference):
    d = decide(report(candidate=candidate, reference=reference), GateSettings(max_greedy_loop_increase=0.05),
               has_champion=True)
    assert d.failed_rules() == ["greedy_loops"] and "was not measured" in d.reasons[1]
    assert next(c for c in d.checks if c.rule == "greedy_loops").value is None


def test_distinct2_just_under_its_floor_reads_as_under_it():
    """79.8% of the reference's distinct-2 fails an 80% floor, and the reason shows 79.8%, not a
    rounded "80% ... the floor is 80%" (make run's loop printed that at round 1)."""
    settings = GateSettings(min_distinct2_ratio=0.8)
    under = decide(report(candidate={"distinct_2": 0.798 * 0.55}), settings, has_champion=True)
    check = next(c for c in under.checks if c.rule == "distinct2_collapse")
    assert not check.passed and "79.8% of the reference's" in check.message and "floor is 80.0%" in check.message
    over = decide(report(candidate={"distinct_2": 0.802 * 0.55}), settings, has_champion=True)
    assert next(c for c in over.checks if c.rule == "distinct2_collapse").passed


def test_the_reasons_name_the_reward_model_that_judged():
    champions = GateSettings(reward_judge="champion")
    against_champion = decide(report(), champions, has_champion=True).checks[0].message
    assert "Judge: the champion's reward model" in against_champion
    first = decide(report(champion_is_reference=True), champions, has_champion=False).checks[0].message
    assert "Judge: the reward model," in first  # against the base model the round's own judges
    untrusted = decide(report(accuracy=[judge_accuracy(0.62, 0.51)]), champions, has_champion=True).checks[0].message
    assert "because the champion's reward model" in untrusted and "judged by the oracle" in untrusted
    assert "Judge: the reward model," in decide(report(), GateSettings(), has_champion=True).checks[0].message
