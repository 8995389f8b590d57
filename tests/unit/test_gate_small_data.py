"""Issue 19 (4): small evaluation sets and empty generations at the gate.

The gate says when its evaluation set is too small to decide and what would decide it; empty
responses are no answer (they lose to any real response; two empty ones are no comparison),
not ties that pull the win rate to one half.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tasks.evaluation.gate import decidable_note, decide, prompts_needed
from tasks.evaluation.metrics import wilson_interval
from tasks.evaluation.settings import EvalSettings, GateSettings
from tasks.evaluation.suite import _Samples, _win_rates
from tests.unit.test_gate import report, win


def _samples(texts, rewards):
    return _Samples(gen=SimpleNamespace(texts=list(texts)), logps=np.zeros(len(texts)),
                    ref_logps=np.zeros(len(texts)), rewards=np.asarray(rewards, dtype=np.float64))


def test_prompts_needed_is_the_smallest_count_whose_lower_bound_clears():
    n = prompts_needed(0.6, 0.5, 0.95)
    assert wilson_interval(0.6 * n, n, 0.95)[0] >= 0.5 > wilson_interval(0.6 * (n - 1), n - 1, 0.95)[0]
    assert prompts_needed(0.5, 0.5, 0.95) is None and prompts_needed(0.4, 0.5, 0.95) is None


def test_an_undecided_gate_says_how_many_prompts_would_decide_it():
    w = win("reward_model", "champion", 0.60, 0.44)  # 100 prompts, interval 0.44-0.76 around 0.5
    d = decide(report(wins=[w]), GateSettings(), has_champion=True)
    msg = next(c.message for c in d.checks if c.rule == "win_rate")
    need = prompts_needed(0.60, 0.5, 0.95)
    assert f"Undecided on 100 prompts: at the observed rate 0.600 about {need} prompts would decide it" in msg
    assert "evaluation.num_prompts" in msg and "evaluation.samples_per_prompt" in msg
    assert msg in d.reasons  # printed in the run summary


def test_a_set_too_small_to_ever_pass_is_named_before_the_run_and_at_the_gate():
    note = decidable_note(EvalSettings(num_prompts=3), GateSettings(min_win_rate_lower_bound=0.5))
    assert note.startswith("evaluation.num_prompts: 3 prompts can never pass the gate")
    assert decidable_note(EvalSettings(num_prompts=35), GateSettings()) is None
    tiny = win("reward_model", "champion", 1.0, 0.44).model_copy(update={"units": 3, "upper": 1.0})
    msg = next(c.message for c in decide(report(wins=[tiny]), GateSettings(), has_champion=True).checks
               if c.rule == "win_rate")
    assert "too small to decide: with 3 prompts even winning every one" in msg


def test_empty_generations_are_not_ties():
    settings = EvalSettings(judge="reward_model")
    # prompts 0-2: both models said nothing (the judge scores both the same); prompt 3: the
    # candidate answers better; prompt 4: the candidate is empty but the judge likes empty text
    cand = _samples(["", " ", "", "a fine answer", ""], [0.0, 0.0, 0.0, 2.0, 9.0])
    ref = _samples(["", "", "\n", "a worse answer", "an answer"], [0.0, 0.0, 0.0, 1.0, 1.0])
    rates = _win_rates({"candidate": cand, "champion": ref, "reference": ref}, settings, groups=list(range(5)))
    w = rates[0]
    assert (w.wins, w.ties, w.losses, w.units) == (1, 0, 1, 2)  # before: 2 wins, 3 ties over 5 prompts
    assert w.rate == 0.5


def test_all_empty_means_no_win_rate_and_the_gate_says_why():
    settings = EvalSettings(judge="reward_model")
    cand, ref = _samples(["", ""], [0.0, 0.0]), _samples(["", ""], [0.0, 0.0])
    assert _win_rates({"candidate": cand, "champion": ref, "reference": ref}, settings, groups=[0, 1]) == []
    r = report(wins=[], candidate={"length": {"mean": 0.0, "empty_share": 1.0}})
    r.champion.length["empty_share"] = 1.0
    msg = next(c.message for c in decide(r, GateSettings(), has_champion=True).checks if c.rule == "win_rate")
    assert "Empty responses: candidate 100.0%, opponent 100.0%" in msg
