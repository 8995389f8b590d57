"""The promotion gate: promote a candidate only on evidence, and say why in plain sentences.

Rules (thresholds in :class:`~tasks.evaluation.settings.GateSettings`), all must pass:

1. ``win_rate`` — the LOWER confidence bound of the candidate's win rate against the champion
   (against the base model, i.e. the reference, for the first candidate) by the configured
   judge is at least ``min_win_rate_lower_bound``: the improvement must be established, not
   just observed.
2. ``kl_budget`` — KL(candidate ‖ reference) is within ``max_kl`` (skipped when None).
3. Guards against reward hacking: ``malformed_share`` (junk text share), ``malformed_increase``
   (its rise over the reference), ``distinct2_collapse`` (distinct-2 against the reference's),
   ``repetition``, and optionally ``length_change``.

A missing or non-finite number fails its rule: a gate never passes on absent evidence.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from tasks.evaluation.report import EvalReport
from tasks.evaluation.settings import GateSettings


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


def _win_rate_check(report: EvalReport, s: GateSettings, has_champion: bool) -> GateCheck:
    opponent = "champion" if has_champion else "reference"
    who = "the champion" if has_champion else "the base model (no champion yet)"
    judge = "the reward model" if s.judge == "reward_model" else "the oracle"
    thr = s.min_win_rate_lower_bound
    w = report.win_rate(s.judge, opponent)
    if w is None:
        return _check("win_rate", None, thr, False,
                      f"No win rate against {who} judged by {judge} is in the report, so the improvement is "
                      f"unproven (is {'an oracle' if s.judge == 'oracle' else 'a reward model'} configured?).")
    ci = f"{w.confidence:.0%} CI {w.lower:.3f}–{w.upper:.3f}, {w.wins}W/{w.ties}T/{w.losses}L over {w.units} prompts"
    ok = w.lower >= thr
    verdict = "clears" if ok else "does not clear"
    tail = "." if ok else ", so the improvement is not established."
    return _check("win_rate", w.lower, thr, ok,
                  f"Win rate against {who} judged by {judge} is {w.rate:.3f} ({ci}); its lower bound "
                  f"{w.lower:.3f} {verdict} the threshold {thr:.3f}{tail}")


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
                         f"Distinct-2 is {cand.distinct_2:.3f}, {ratio:.0%} of the reference's {ref.distinct_2:.3f}"
                         f"; the floor is {s.min_distinct2_ratio:.0%}" + ("." if ok else " (diversity collapsed).")))

    r = cand.repetition_rate
    ok = _finite(r) and r <= s.max_repetition_rate
    checks.append(_check("repetition", r, s.max_repetition_rate, ok,
                         f"Within-response repetition is {_pct(r)}, {'within' if ok else 'above'} the limit of "
                         f"{_pct(s.max_repetition_rate)}."))

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
