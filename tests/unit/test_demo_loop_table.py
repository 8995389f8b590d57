"""The closed-loop demo's per-round figures (from an evaluation report) and its round plot."""

from __future__ import annotations

import json

import pytest

from flows.demo import _first_failure, candidate_figures, greedy_cell
from tasks.evaluation.plots import base_line, plot_loop_rounds


def test_candidate_figures_read_the_report_and_the_budget_stop(tmp_path):
    run = tmp_path / "dpo-x"
    (run / "final").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"budget": {"stop": {"kept_step": 12, "stopped_at": 16,
                                                                      "reason": "KL"}, "readings": []}}))
    report = {"candidate": {"path": str(run / "final"), "oracle_mean": 0.6, "kl": 5.0, "distinct_2": 0.54,
                            "repeated_trigram_rate": 0.03},
              "reference": {"oracle_mean": 0.2, "distinct_2": 0.6, "repeated_trigram_rate": 0.01},
              "win_rates": [{"judge": "reward_model", "opponent": "champion", "rate": 0.9, "lower": 0.8, "upper": 0.95},
                            {"judge": "oracle", "opponent": "champion", "rate": 0.7, "lower": 0.6, "upper": 0.78}]}
    path = tmp_path / "eval_report.json"
    path.write_text(json.dumps(report))
    out = candidate_figures(path)
    assert out["candidate oracle"] == 0.6 and out["candidate KL"] == 5.0
    assert abs(out["distinct-2 / base"] - 0.9) < 1e-9 and abs(out["rep-3 rise"] - 0.02) < 1e-9
    assert out["oracle win vs champion"] == (0.7, 0.6, 0.78) and out["budget stop"] == "step 12"
    assert out["greedy looping"] is None and greedy_cell(out) == "-"  # a report from before the greedy figures
    assert candidate_figures(tmp_path / "missing.json") == {}


def test_the_rounds_greedy_loop_figures_come_from_the_report(tmp_path):
    """The loop's row carries the candidate's greedy looping share, the base's, the rise's paired
    standard error and the number of greedy prompts; the table cell shows the rise with its error."""
    report = {"candidate": {"path": str(tmp_path / "final"), "oracle_mean": 0.7, "kl": 9.0, "distinct_2": 0.5,
                            "greedy_looping_share": 0.534, "greedy_looping_share_evaluated": 0.55, "eos_share": 0.4},
              "reference": {"distinct_2": 0.6, "greedy_looping_share": 0.466},
              "num_greedy_prompts": 220, "greedy_loop_rise_se": 0.031}
    path = tmp_path / "eval_report.json"
    path.write_text(json.dumps(report))
    out = candidate_figures(path)
    assert (out["greedy looping"], out["base greedy looping"], out["greedy rise SE"], out["greedy prompts"]) == (
        0.534, 0.466, 0.031, 220)
    assert out["greedy looping (evaluated prompts)"] == 0.55 and out["answers ending"] == 0.4
    assert greedy_cell(out) == "53.4% (+6.8 ± 3.1)"
    assert greedy_cell({**out, "greedy rise SE": None}) == "53.4% (+6.8)"


def test_first_failure_names_the_first_failed_rule():
    reasons = ["Not promoted: 1 of 6 rules failed (distinct-2).", "Distinct-2 is 0.48, 73% of the reference's."]
    assert _first_failure(reasons).startswith("Distinct-2 is 0.48")
    assert _first_failure(reasons[:1]).startswith("Not promoted")
    assert _first_failure(None) is None


def test_round_plot_marks_promoted_and_rejected_candidates(tmp_path):
    rows = [{"round": 0, "candidate oracle": 0.5, "candidate KL": 4.0, "promoted": True, "oracle": 0.5, "kl": 4.0},
            {"round": 1, "candidate oracle": 0.55, "candidate KL": 25.0, "promoted": False, "oracle": 0.5, "kl": 4.0},
            {"round": 2, "candidate oracle": None, "candidate KL": None, "promoted": False, "oracle": None, "kl": None}]
    path = plot_loop_rounds(rows, tmp_path / "p.png", baseline=0.2, max_kl=20)
    assert path.exists() and path.stat().st_size > 10_000


def test_the_base_line_follows_each_rounds_prompts():
    """Round 0 evaluates on 220 prompts and later rounds on 2,092: the base's line is each round's own
    figure, not the last round's drawn under all of them."""
    rows = [{"round": 0, "base oracle": 0.206}, {"round": 1, "base oracle": 0.231}, {"round": 2, "base oracle": None},
            {"round": 3, "base oracle": 0.231}]
    assert base_line(rows, baseline=0.231) == [(0, 0.206), (1, 0.231), (3, 0.231)]
    # rows written before the per-round figure: the one baseline at every round
    assert base_line([{"round": 0}, {"round": 1}], baseline=0.2) == [(0, 0.2), (1, 0.2)]
    assert base_line([{"round": 0}], baseline=None) == []


def test_kl_budget_grows_per_round_up_to_its_cap():
    from tasks.demo.settings import LoopSettings

    loop = LoopSettings(kl_budget_start=6, kl_budget_step=3, kl_budget_max=17)
    assert [loop.kl_budget(k) for k in range(6)] == [6, 9, 12, 15, 17, 17]
    assert LoopSettings().kl_budget(3) is None


def test_round_overrides_set_the_rounds_budget_against_the_base_model(tmp_path):
    from flows.demo import round_overrides
    from tasks.config import load_pipeline_config

    sets = ["dpo.budget={max_kl: 6}", "demo.loop={kl_budget_start: 6, kl_budget_step: 4, kl_budget_max: 16}",
            f"pipeline.home={tmp_path}"]
    cfg = load_pipeline_config(None, sets)
    extra = round_overrides(cfg, "/models/base", 2)
    assert extra == ["dpo.budget.max_kl=14", "dpo.budget.reference={name_or_path: '/models/base'}"]
    budget = load_pipeline_config(None, sets + extra).dpo.budget
    assert budget.max_kl == 14 and budget.reference.name_or_path == "/models/base"
    no_budget = load_pipeline_config(None, [f"pipeline.home={tmp_path}", "dpo.budget=null"] + sets[1:2])
    assert round_overrides(no_budget, "/b", 2) == []


def test_beta_schedule_sets_each_rounds_dpo_beta_and_keeps_the_last(tmp_path):
    from flows.demo import round_overrides
    from tasks.config import load_pipeline_config
    from tasks.demo.settings import LoopSettings

    assert LoopSettings().beta(0) is None
    with pytest.raises(ValueError):
        LoopSettings(betas=[1.0, 0.0])
    sets = [f"pipeline.home={tmp_path}", "demo.loop={betas: [1.0, 0.5, 0.3]}"]
    cfg = load_pipeline_config(None, sets)
    assert [round_overrides(cfg, "/b", k) for k in (0, 2, 5)] == [["dpo.beta=1"], ["dpo.beta=0.3"], ["dpo.beta=0.3"]]
    assert load_pipeline_config(None, sets + round_overrides(cfg, "/b", 1)).dpo.beta == 0.5
    both = load_pipeline_config(None, sets + ["dpo.budget={max_kl: 6}", "demo.loop.kl_budget_start=6"])
    assert round_overrides(both, "/b", 1)[0] == "dpo.beta=0.5" and "dpo.budget.max_kl=6" in round_overrides(both, "/b", 1)
    coefs = load_pipeline_config(None, sets + ["demo.loop.entropy_coefs=[0.01, 0.03]"])
    assert round_overrides(coefs, "/b", 0) == ["dpo.beta=1", "dpo.entropy_coef=0.01"]
    assert load_pipeline_config(None, sets + round_overrides(coefs, "/b", 4)).dpo.entropy_coef == 0.03


def test_nll_and_eos_schedules_set_each_rounds_dpo_terms(tmp_path):
    """``demo.loop.nll_coefs`` and ``entropy_excludes_eos`` reach the round's DPO section, the last
    entry standing for later rounds; empty lists leave the dpo section as configured."""
    from flows.demo import round_overrides
    from tasks.config import load_pipeline_config
    from tasks.demo.settings import LoopSettings

    assert LoopSettings().nll_coef(2) is None and LoopSettings().excludes_eos(2) is None
    with pytest.raises(ValueError):
        LoopSettings(nll_coefs=[0.05, -0.1])
    sets = [f"pipeline.home={tmp_path}", "dpo.nll_coef=0.05",
            "demo.loop={nll_coefs: [0.05, 0.2, 0.3], entropy_excludes_eos: [false, true]}"]
    cfg = load_pipeline_config(None, sets)
    assert round_overrides(cfg, "/b", 0) == ["dpo.nll_coef=0.05", "dpo.entropy_excludes_eos=false"]
    assert round_overrides(cfg, "/b", 1) == ["dpo.nll_coef=0.2", "dpo.entropy_excludes_eos=true"]
    for k, nll, no_eos in ((0, 0.05, False), (1, 0.2, True), (2, 0.3, True), (5, 0.3, True)):
        dpo = load_pipeline_config(None, sets + round_overrides(cfg, "/b", k)).dpo
        assert (dpo.nll_coef, dpo.entropy_excludes_eos) == (nll, no_eos), k
    plain = load_pipeline_config(None, [f"pipeline.home={tmp_path}", "dpo.nll_coef=0.07", "demo.loop={betas: [0.5]}"])
    assert round_overrides(plain, "/b", 3) == ["dpo.beta=0.5"]
    assert load_pipeline_config(None, [f"pipeline.home={tmp_path}", "dpo.nll_coef=0.07", "demo.loop={betas: [0.5]}",
                                       *round_overrides(plain, "/b", 3)]).dpo.nll_coef == 0.07


def test_round_report_is_the_registered_candidates_not_the_newest(tmp_path):
    """A round whose evaluation was cached leaves an older report than another candidate's: the
    row must read the report of the candidate the round registered (its digest tag)."""
    import os
    import time

    from mlflow import MlflowClient

    from flows.demo import round_report
    from tasks import tracking
    from tasks.stages.register import CANDIDATE_TAG

    tracking.configure(tmp_path / "home", "p")
    client = MlflowClient()
    client.create_registered_model("p-policy")
    version = client.create_model_version("p-policy", str(tmp_path), tags={CANDIDATE_TAG: "abc"}).version
    runs = tmp_path / "runs"
    for digest in ("abc", "zzz"):
        (runs / f"eval-{digest}").mkdir(parents=True)
        (runs / f"eval-{digest}" / "eval_report.json").write_text("{}")
    old = time.time() - 3600
    os.utime(runs / "eval-abc" / "eval_report.json", (old, old))
    registry = {"policy_model": "p-policy", "policy_version": str(version)}
    assert round_report(runs, registry) == runs / "eval-abc" / "eval_report.json"
    assert round_report(runs, None) is None and round_report(runs, {"policy_version": None}) is None


def test_feedback_figures_take_the_simulate_stage_figures_and_the_pairs_built():
    from flows.demo import feedback_figures

    summary = {"stages": [{"stage": "ingest", "metrics": {"pairs": 7}},
                          {"stage": "build preferences", "metrics": {"pairs": 525}}]}
    sim = {"batch": "round002-abc", "kept samples": 2063, "paired samples": 1218}
    assert feedback_figures(sim, summary) == {"paired samples": 1218, "pairs built": 525}
    # a simulate stage without the figure (or a round that stopped before building) leaves them empty
    assert feedback_figures({"batch": "round003-def"}, {}) == {"paired samples": None, "pairs built": None}


def test_step_schedule_sets_each_rounds_dpo_max_steps(tmp_path):
    """``demo.loop.max_steps``: null keeps the configured epochs, a number reaches ``dpo.max_steps``,
    the last entry standing for later rounds."""
    from flows.demo import round_overrides
    from tasks.config import load_pipeline_config

    sets = [f"pipeline.home={tmp_path}", "demo.loop={max_steps: [null, 60]}"]
    cfg = load_pipeline_config(None, sets)
    assert [round_overrides(cfg, "/b", k) for k in (0, 1, 4)] == [[], ["dpo.max_steps=60"], ["dpo.max_steps=60"]]
    assert load_pipeline_config(None, sets + round_overrides(cfg, "/b", 3)).dpo.max_steps == 60
    assert load_pipeline_config(None, sets).dpo.max_steps is None
    with pytest.raises(ValueError):
        load_pipeline_config(None, [f"pipeline.home={tmp_path}", "demo.loop={max_steps: [0]}"])


def test_eval_prompt_schedule_sets_each_rounds_evaluated_prompts(tmp_path):
    """``demo.loop.eval_num_prompts``: round k evaluates on that many held-out prompts, the last entry
    for later rounds; empty leaves ``evaluation.num_prompts`` as configured."""
    from flows.demo import round_overrides
    from tasks.config import load_pipeline_config
    from tasks.demo.settings import LoopSettings

    assert LoopSettings().eval_prompts(3) is None
    with pytest.raises(ValueError):
        LoopSettings(eval_num_prompts=[220, 0])
    sets = [f"pipeline.home={tmp_path}", "evaluation.num_prompts=300", "demo.loop={eval_num_prompts: [220, 2000]}"]
    cfg = load_pipeline_config(None, sets)
    assert round_overrides(cfg, "/b", 0) == ["evaluation.num_prompts=220"]
    for k, n in ((0, 220), (1, 2000), (4, 2000)):
        assert load_pipeline_config(None, sets + round_overrides(cfg, "/b", k)).evaluation.num_prompts == n
    plain = load_pipeline_config(None, [f"pipeline.home={tmp_path}", "evaluation.num_prompts=300", "demo.loop={betas: [0.5]}"])
    assert round_overrides(plain, "/b", 2) == ["dpo.beta=0.5"]

