"""The promotion gate: promote a candidate only on evidence, and say why in plain sentences.

Rules (thresholds in :class:`~tasks.evaluation.settings.GateSettings`), all must pass:

1. ``win_rate`` — the LOWER confidence bound of the candidate's win rate against the champion
   (against the base model, i.e. the reference, for the first candidate) by the judge is at
   least ``min_win_rate_lower_bound``: the improvement must be established, not just observed.
   The judge is the configured one, but a reward model must earn it: when the lower bound of
   its held-out pairwise accuracy misses ``min_judge_accuracy`` (or was not measured), its
   verdict alone does not promote; the oracle decides where one exists, else the rule fails.
   The message names the judge that decided and its reliability (accuracy, interval, ECE,
   agreement with the oracle on the evaluated pairs).
2. ``kl_budget`` — KL(candidate ‖ reference) is within ``max_kl`` (skipped when None).
3. Guards against reward hacking: ``malformed_share`` (junk text share), ``malformed_increase``
   (its rise over the reference), ``distinct2_collapse`` (distinct-2 against the reference's),
   ``repetition`` (repeated bigrams within responses), ``repeated_trigrams`` (their rise over
   the reference: loops, stuffed phrases), ``fluency`` (the fall of the per-token
   log-likelihood of the candidate's text under the reference: word salad, stuffing),
   ``greedy_loops`` (the rise of the share of greedy responses that loop over the reference's:
   sampled text can read well while the model's most likely text loops), and optionally
   ``length_change``.

A missing or non-finite number fails its rule: a gate never passes on absent evidence.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from tasks.evaluation.metrics import wilson_interval
from tasks.evaluation.report import EvalReport
from tasks.evaluation.settings import EvalSettings, GateSettings


class GateCheck(BaseModel):
    """One rule's verdict."""

    rule: str
    value: float | None
    """The measured number (None when the report lacks it)."""
    threshold: float | None
    passed: bool
    message: str
    """A sentence explaining the verdict."""


class GateDecision(BaseModel):
    """The gate's verdict: ``reasons`` are sentences (the verdict first), ``checks`` one row per rule."""

    passed: bool
    reasons: list[str] = Field(default_factory=list)
    checks: list[GateCheck] = Field(default_factory=list)

    def failed_rules(self) -> list[str]:
        return [c.rule for c in self.checks if not c.passed]


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _check(rule: str, value: float | None, threshold: float | None, ok: bool, message: str) -> GateCheck:
    return GateCheck(rule=rule, value=value, threshold=threshold, passed=bool(ok), message=message)


def prompts_needed(rate: float, threshold: float, confidence: float, limit: int = 1_000_000) -> int | None:
    """The fewest prompts at which a win rate of ``rate`` has its Wilson lower bound at
    ``threshold`` or above; None when ``rate`` does not exceed the threshold (no number of
    prompts establishes it) or more than ``limit`` would be needed."""
    if rate <= threshold:
        return None
    lo, hi = 1, 1
    while wilson_interval(rate * hi, hi, confidence)[0] < threshold:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:  # the lower bound grows with n at a fixed rate: bisect
        mid = (lo + hi) // 2
        if wilson_interval(rate * mid, mid, confidence)[0] >= threshold:
            hi = mid
        else:
            lo = mid + 1
    return hi


def decidable_note(evaluation: EvalSettings, gate: GateSettings) -> str | None:
    """A sentence when ``evaluation.num_prompts`` is too few for the win-rate rule to ever pass
    (even winning every prompt leaves the lower bound under ``gate.min_win_rate_lower_bound``),
    else None. Checked before a run; the split can make the real count smaller still."""
    n, thr, conf = evaluation.num_prompts, gate.min_win_rate_lower_bound, evaluation.confidence
    best = wilson_interval(n, n, conf)[0]
    if best >= thr:
        return None
    need = prompts_needed(1.0, thr, conf)
    return (f"evaluation.num_prompts: {n} prompts can never pass the gate: even winning all of them gives a "
            f"{conf:.0%} lower bound of {best:.3f}, under gate.min_win_rate_lower_bound {thr:g}; it needs at least "
            f"{need} held-out prompts (evaluation.prompt_splits)")


def _small_data_advice(w, thr: float) -> str:
    """What would decide an undecided win-rate rule (its interval straddles the threshold)."""
    units = f"{w.units} prompts"
    best = wilson_interval(w.units, w.units, w.confidence)[0]
    if best < thr:
        need = prompts_needed(1.0, thr, w.confidence)
        return (f" The evaluation set is too small to decide: with {units} even winning every one gives a lower "
                f"bound of {best:.3f}; it takes at least {need} prompts (raise evaluation.num_prompts, add the validation "
                f"split to evaluation.prompt_splits, or give the test split more prompts: more feedback or a larger "
                f"preferences.splits.test).")
    if w.upper < thr:
        return ""  # decided: the candidate is worse than required
    need = prompts_needed(w.rate, thr, w.confidence)
    if need is None:
        return (f" Its observed rate {w.rate:.3f} is not above {thr:.3f}, so more prompts would not establish "
                "the improvement.")
    return (f" Undecided on {units}: at the observed rate {w.rate:.3f} about {need} prompts would decide it (raise "
            f"evaluation.num_prompts, add the validation split to evaluation.prompt_splits, or give the test split "
            f"more prompts: more feedback or a larger preferences.splits.test). evaluation.samples_per_prompt makes each prompt's verdict less noisy but "
            f"does not add prompts, the units of this interval.")


def _reliability(report: EvalReport, opponent: str) -> str:
    """The reward model's record as a judge, in words."""
    acc, agree = report.accuracy("reward_model"), report.agreement(opponent)
    if acc is None:
        text = "its held-out accuracy was not measured (no held-out pairs were scored)"
    else:
        text = (f"held-out accuracy {acc.accuracy:.3f} (CI {acc.lower:.3f}–{acc.upper:.3f} on {acc.n} pairs, "
                f"calibration error {acc.ece:.3f})")
    if agree is not None:
        text += (f", agreeing with the oracle on {_pct(agree.rate)} of the {agree.n} evaluated pairs the oracle "
                 f"decided (CI {_pct(agree.lower)}–{_pct(agree.upper)})")
    return text


def _model_judge(report: EvalReport, s: GateSettings) -> tuple[str | None, str]:
    """The judge model (evaluation.judge_model) decides only when its accuracy on the held-out
    pairs (people's labels) clears ``min_judge_accuracy``, as the reward model must."""
    acc = report.accuracy("model")
    if acc is None:
        return None, ("No trusted judge: gate.judge is model, but no judge-model accuracy is in the report (set "
                      "evaluation.judge_model; the held-out pairs measure it).")
    record = (f"agreeing with people on {acc.accuracy:.3f} of {acc.n} held-out pairs (CI {acc.lower:.3f}–"
              f"{acc.upper:.3f}; its two answer orders disagreeing counts half)")
    floor = s.min_judge_accuracy
    if floor is None or (_finite(acc.lower) and acc.lower >= floor):
        met = "not checked (gate.min_judge_accuracy is unset)" if floor is None else f"clears {floor:.3f}"
        return "model", f"Judge: the judge model, {record}; {met}."
    return None, (f"No trusted judge: the judge model is {record}; its lower bound {acc.lower:.3f} misses "
                  f"gate.min_judge_accuracy {floor:.3f}, so its verdict does not promote (a stronger judge model "
                  f"decides better).")


def _choose_judge(report: EvalReport, s: GateSettings, opponent: str) -> tuple[str | None, str]:
    """(the judge whose win rate decides, or None when no trusted judge exists; a sentence saying
    which judge decided and how reliable it is)."""
    if s.judge == "oracle":
        return "oracle", "Judge: the oracle (gate.judge)."
    if s.judge == "model":
        return _model_judge(report, s)
    record = _reliability(report, opponent)
    floor = s.min_judge_accuracy
    rm_name = ("the champion's reward model (gate.reward_judge; it never saw this round's feedback)"
          if s.reward_judge == "champion" and opponent == "champion" else "the reward model")
    if floor is None:
        return "reward_model", f"Judge: {rm_name}, not checked (gate.min_judge_accuracy is unset); {record}."
    acc = report.accuracy("reward_model")
    if acc is not None and _finite(acc.lower) and acc.lower >= floor:
        return "reward_model", (f"Judge: {rm_name}, {record}; its lower bound {acc.lower:.3f} clears "
                                f"gate.min_judge_accuracy {floor:.3f}.")
    missed = (f"its lower bound {acc.lower:.3f} misses gate.min_judge_accuracy {floor:.3f}" if acc is not None
              else f"so it cannot be held to gate.min_judge_accuracy {floor:.3f}")
    rm = report.win_rate("reward_model", opponent)
    rm_verdict = (f" (its own verdict: win rate {rm.rate:.3f}, lower bound {rm.lower:.3f})" if rm is not None else "")
    if report.win_rate("oracle", opponent) is not None:
        return "oracle", (f"Judge: the oracle, because {rm_name} is not a trusted judge: {record}; {missed}, "
                          f"so its verdict alone does not promote{rm_verdict}.")
    return None, (f"No trusted judge: {rm_name} has {record}; {missed}, and no oracle verdict exists, so "
                  f"its verdict alone does not promote{rm_verdict}.")


def _win_rate_check(report: EvalReport, s: GateSettings, has_champion: bool) -> GateCheck:
    opponent = "champion" if has_champion else "reference"
    who = "the champion" if has_champion else "the base model (no champion yet)"
    thr = s.min_win_rate_lower_bound
    judge_key, judged_by = _choose_judge(report, s, opponent)
    if judge_key is None:
        return _check("win_rate", None, thr, False, judged_by + _empty_note(report))
    judge = {"reward_model": "the reward model", "oracle": "the oracle", "model": "the judge model"}[judge_key]
    w = report.win_rate(judge_key, opponent)
    if w is None:
        return _check("win_rate", None, thr, False,
                      f"{judged_by} No win rate against {who} judged by {judge} is in the report, so the "
                      f"improvement is unproven (is {'an oracle' if judge_key == 'oracle' else 'a judge model' if judge_key == 'model' else 'a reward model'} "
                      f"configured?)." + _empty_note(report))
    ci = f"{w.confidence:.0%} CI {w.lower:.3f}–{w.upper:.3f}, {w.wins}W/{w.ties}T/{w.losses}L over {w.units} prompts"
    ok = w.lower >= thr
    verdict = "clears" if ok else "does not clear"
    tail = "." if ok else ", so the improvement is not established." + _small_data_advice(w, thr)
    tail += _empty_note(report)
    return _check("win_rate", w.lower, thr, ok,
                  f"Win rate against {who} judged by {judge} is {w.rate:.3f} ({ci}); its lower bound "
                  f"{w.lower:.3f} {verdict} the threshold {thr:.3f}{tail} {judged_by}")


def _empty_note(report: EvalReport) -> str:
    """How empty responses entered the win rate (see :func:`tasks.evaluation.suite.evaluate_models`)."""
    shares = {role: getattr(report, role).length.get("empty_share", 0.0) for role in ("candidate", "champion")}
    if not any(shares.values()):
        return ""
    return (f" Empty responses: candidate {_pct(shares['candidate'])}, opponent {_pct(shares['champion'])} (an "
            "empty response loses to any other; two empty ones are no comparison and are left out).")


def _readability_checks(report: EvalReport, s: GateSettings) -> list[GateCheck]:
    """Guards against word stuffing and loops beyond distinct-2: repeated trigrams and fluency,
    each measured against the reference's own samples (a model's text is judged by the change
    it brings, so a corpus that repeats itself by nature does not fail every candidate)."""
    cand, ref = report.candidate, report.reference
    checks = []
    if s.max_repeated_trigram_increase is not None:
        c, r = cand.repeated_trigram_rate, ref.repeated_trigram_rate
        rise = c - r if _finite(c) and _finite(r) else None
        ok = rise is not None and rise <= s.max_repeated_trigram_increase
        shown = (f"went from {_pct(r)} (reference) to {_pct(c)}, {100 * rise:+.1f} points" if rise is not None
                 else "was not measured")
        checks.append(_check("repeated_trigrams", rise, s.max_repeated_trigram_increase, ok,
                             f"The repeated-trigram share {shown}, {'within' if ok else 'beyond'} the allowed "
                             f"{100 * s.max_repeated_trigram_increase:+.1f}" + ("." if ok else " (loops or stuffed "
                                                                                 "phrases).")))
    if s.max_fluency_drop is not None:
        c, r = cand.fluency, ref.fluency
        drop = r - c if _finite(c) and _finite(r) else None
        ok = drop is not None and drop <= s.max_fluency_drop
        shown = (f"is {c:.2f} nats per token against the reference's own {r:.2f}, a fall of {drop:.2f}"
                 if drop is not None else "was not measured")
        checks.append(_check("fluency", drop, s.max_fluency_drop, ok,
                             f"Under the base model the candidate's text {shown}, {'within' if ok else 'beyond'} "
                             f"the allowed {s.max_fluency_drop:.2f}" + ("." if ok else " (text the base model "
                                                                         "finds unlikely: stuffing or junk).")))
    if s.max_greedy_loop_increase is not None:
        checks.append(_greedy_loop_check(report, s.max_greedy_loop_increase))
    return checks


def _greedy_loop_check(report: EvalReport, limit: float) -> GateCheck:
    """The share of greedy responses that loop, the candidate's against the reference's, with the
    number of prompts and the rise's standard error (paired per prompt) where the report has them."""
    cand, ref = report.candidate, report.reference
    c, r = cand.greedy_looping_share, ref.greedy_looping_share
    rise = c - r if _finite(c) and _finite(r) else None
    ok = rise is not None and rise <= limit
    if rise is None:
        shown = "was not measured (evaluation.greedy is off, or the report predates it)"
    else:
        seq = ("" if not (_finite(cand.greedy_seq_rep3) and _finite(ref.greedy_seq_rep3)) else
               f" (mean seq-rep-3 {ref.greedy_seq_rep3:.3f} to {cand.greedy_seq_rep3:.3f})")
        over = f" of {report.num_greedy_prompts} held-out prompts" if report.num_greedy_prompts else ""
        se = (f" (standard error {100 * report.greedy_loop_rise_se:.1f}, paired per prompt)"
              if _finite(report.greedy_loop_rise_se) else "")
        shown = f"went from {_pct(r)} (reference) to {_pct(c)}{over}{seq}, {100 * rise:+.1f} points{se}"
    return _check("greedy_loops", rise, limit, ok,
                  f"The share of greedy responses that loop {shown}, {'within' if ok else 'beyond'} the allowed "
                  f"{100 * limit:+.1f}" + ("." if ok else " (the model's most likely text repeats itself)."))


def decide(report: EvalReport, settings: GateSettings, has_champion: bool) -> GateDecision:
    """Apply the gate rules to ``report``; ``has_champion`` False means the first candidate,
    compared with the base model. Raises ValueError when ``has_champion`` is True but the
    report was made without a champion (it would judge against the wrong model)."""
    if has_champion and report.champion_is_reference:
        raise ValueError("a champion exists but the eval report compared the candidate with the reference; "
                         "re-run the evaluation with the champion")
    s, cand, ref = settings, report.candidate, report.reference
    checks = [_win_rate_check(report, s, has_champion)]

    if s.max_kl is None:
        checks.append(_check("kl_budget", cand.kl, None, True, "No KL budget is configured."))
    else:
        ok = _finite(cand.kl) and cand.kl <= s.max_kl
        value = f"{cand.kl:.2f} nats (SE {cand.kl_se or 0:.2f})" if _finite(cand.kl) else "not measured"
        checks.append(_check("kl_budget", cand.kl, s.max_kl, ok,
                             f"KL to the reference is {value}, {'within' if ok else 'outside'} the budget of "
                             f"{s.max_kl:g} nats."))

    m = cand.malformed_share
    ok = _finite(m) and m <= s.max_malformed_share
    checks.append(_check("malformed_share", m, s.max_malformed_share, ok,
                         f"{_pct(m)} of the candidate's responses are malformed (invalid UTF-8, control characters "
                         f"or junk runs), {'within' if ok else 'above'} the limit of {_pct(s.max_malformed_share)}."))

    rise = cand.malformed_share - ref.malformed_share
    ok = _finite(rise) and rise <= s.max_malformed_increase
    checks.append(_check("malformed_increase", rise, s.max_malformed_increase, ok,
                         f"The malformed share went from {_pct(ref.malformed_share)} (reference) to {_pct(m)}, a "
                         f"change of {100 * rise:+.1f} points, {'within' if ok else 'more than'} the allowed "
                         f"{100 * s.max_malformed_increase:.1f}."))

    floor = s.min_distinct2_ratio * ref.distinct_2
    ok = _finite(cand.distinct_2) and cand.distinct_2 >= floor
    ratio = cand.distinct_2 / ref.distinct_2 if ref.distinct_2 > 0 else math.inf
    checks.append(_check("distinct2_collapse", cand.distinct_2, floor, ok,
                         f"Distinct-2 is {cand.distinct_2:.3f}, {ratio:.1%} of the reference's {ref.distinct_2:.3f}"
                         f"; the floor is {s.min_distinct2_ratio:.1%}" + ("." if ok else " (diversity collapsed).")))

    r = cand.repetition_rate
    ok = _finite(r) and r <= s.max_repetition_rate
    checks.append(_check("repetition", r, s.max_repetition_rate, ok,
                         f"Within-response repetition is {_pct(r)}, {'within' if ok else 'above'} the limit of "
                         f"{_pct(s.max_repetition_rate)}."))

    checks += _readability_checks(report, s)

    if s.max_length_change is not None:
        change = report.length_drift.get("relative_change")
        ok = _finite(change) and abs(change) <= s.max_length_change
        shown = f"{change:+.0%}" if _finite(change) else "not measured"
        checks.append(_check("length_change", change, s.max_length_change, ok,
                             f"Mean response length changed by {shown} against the reference, "
                             f"{'within' if ok else 'beyond'} ±{s.max_length_change:.0%}."))

    failed = [c for c in checks if not c.passed]
    if failed:
        head = (f"Not promoted: {len(failed)} of {len(checks)} rules failed "
                f"({', '.join(c.rule for c in failed)}).")
        reasons = [head] + [c.message for c in failed]
    else:
        head = f"Promoted: all {len(checks)} rules passed."
        reasons = [head] + [c.message for c in checks]
    return GateDecision(passed=not failed, reasons=reasons, checks=checks)
