"""The closed-loop demo: each round samples feedback from the current champion (simulated
annotators with the VADER oracle), runs the pipeline, which retrains and promotes only if the
gate passes, and records the champion's oracle reward. Ends with a per-round table (candidate
and champion: oracle, KL, distinct-2, repeated trigrams, the oracle win rate against the
previous champion with its 95% interval, the DPO drift budget's stop) and a plot, both logged
on the demo's MLflow run."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from rich.table import Table

from flows.pipeline import alignment_pipeline
from tasks import tracking
from tasks.config import PipelineConfig, load_pipeline_config
from tasks.data.landing import PENDING, ledger_for
from tasks.evaluation.plots import plot_closed_loop, plot_loop_rounds
from tasks.lock import home_lock
from tasks.stages.data import data_dir, ingest_settings
from tasks.stages.demo import (
    demo_base_model_task,
    finish_simulated_landing,
    simulate_feedback_task,
    simulation_figures,
    simulator_dir,
)
from tasks.stages.models import champion_record
from tasks.stages.register import CANDIDATE_TAG
from tasks.stages.summary import report_console


def next_round_index(landing: Path) -> int:
    """One past the highest simulated round already in the landing folder."""
    found = [int(m.group(1)) for p in landing.glob("round*-*") if (m := re.match(r"round(\d+)-", p.name))]
    return max(found) + 1 if found else 0


def unfinished_round(cfg: PipelineConfig, landing: Path) -> tuple[int, dict[str, Any]] | None:
    """(index, simulation figures) of the newest simulated round whose feedback no round has
    consumed: its files are unknown to the ledger or still pending there, because the process died
    or the round failed after the batch landed. The loop finishes that round with that batch
    instead of simulating another (which would leave this one's feedback unused). None when the
    newest batch was consumed or refused (failed on its data), or there is none. The figures come
    from the simulator's report (empty if it has none)."""
    index = next_round_index(landing) - 1
    files = [p for p in landing.glob(f"round{index:03d}-*") if p.is_file()] if index >= 0 else []
    if not files:
        return None
    states = {e.get("path"): e["state"] for e in ledger_for(ingest_settings(cfg), data_dir(cfg)).latest().values()}
    if all(states.get(str(p)) not in (None, PENDING) for p in files):
        return None
    report = next(simulator_dir(cfg).glob(f"report-round{index:03d}-*.json"), None)
    return index, simulation_figures(json.loads(report.read_text())) if report else {}


def champion_oracle(cfg) -> tuple[str | None, float | None, float | None, float | None]:
    """(version, oracle mean, KL to base, the base model's oracle mean on the same prompts) of the
    champion, from the tags of the evaluation that promoted it (the base's is None on a version
    registered before that tag existed)."""
    name = tracking.policy_model_name(cfg.pipeline.name)
    version = tracking.alias_version(name, tracking.CHAMPION)
    if version is None:
        return None, None, None, None
    tags = tracking.version_tags(name, version)
    values = (tags.get(f"alignflow.eval.{k}") for k in ("oracle_mean", "kl", "base_oracle_mean"))
    return version, *(float(v) if v else None for v in values)


def round_overrides(cfg, base_path: str, round_index: int) -> list[str]:
    """Per-round settings of the loop (``demo.loop``): this round's DPO β, entropy weight, NLL
    (RPO) weight, evaluated prompts, optimizer steps and whether the entropy term leaves EOS alone, and the DPO drift budget of this
    round, measured against the base model at ``base_path``. Empty without a schedule."""
    if cfg.demo is None:
        return []
    loop = cfg.demo.loop
    out = [] if (beta := loop.beta(round_index)) is None else [f"dpo.beta={beta:g}"]
    if (coef := loop.entropy_coef(round_index)) is not None:
        out.append(f"dpo.entropy_coef={coef:g}")
    if (nll := loop.nll_coef(round_index)) is not None:
        out.append(f"dpo.nll_coef={nll:g}")
    if (prompts := loop.eval_prompts(round_index)) is not None:
        out.append(f"evaluation.num_prompts={prompts}")
    if (steps := loop.dpo_max_steps(round_index)) is not None:
        out.append(f"dpo.max_steps={steps}")
    if (no_eos := loop.excludes_eos(round_index)) is not None:
        out.append(f"dpo.entropy_excludes_eos={str(no_eos).lower()}")
    budget = loop.kl_budget(round_index)
    if budget is not None and cfg.dpo.budget is not None:
        out += [f"dpo.budget.max_kl={budget:g}", f"dpo.budget.reference={{name_or_path: '{base_path}'}}"]
    return out


def feedback_figures(sim: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The round's feedback as DPO got it: kept samples on prompts that keep at least two (the
    simulate stage's figures) and the preference pairs the pipeline built (all the batches it
    read, ``preferences.recent_batches``)."""
    stages = summary.get("stages") or []
    pairs = next((s.get("metrics", {}).get("pairs") for s in stages if s.get("stage") == "build preferences"), None)
    return {"paired samples": sim.get("paired samples"), "pairs built": pairs}


def round_report(runs: Path, registry: dict[str, Any] | None) -> Path | None:
    """The evaluation report of the candidate this round registered (or found registered): the
    folder named by the version's candidate digest. Not the newest report in ``runs``: a cached
    evaluation leaves its report as it was, older than another candidate's. None when the round
    registered nothing (it stopped before the gate)."""
    if not registry or not registry.get("policy_version"):
        return None
    digest = tracking.version_tags(registry["policy_model"], registry["policy_version"]).get(CANDIDATE_TAG)
    return runs / f"eval-{digest}" / "eval_report.json" if digest else None


def candidate_figures(report_path: Path | None) -> dict[str, Any]:
    """The round's candidate from its evaluation report: oracle, KL, distinct-2 (and its share
    of the base model's), repeated-trigram share (and its rise over the base's), the oracle's
    paired win rate against the champion it challenged (per held-out prompt, 95% interval: a
    lower bound above 0.5 is a gain beyond sampling noise), the greedy-loop figures (the candidate's
    looping share, its rise over the base model's with the rise's paired standard error, the number
    of greedy prompts, the share on the evaluated prompts alone), the share of sampled answers that
    end (EOS) and the DPO drift budget's stop."""
    if report_path is None or not report_path.exists():
        return {}
    report = json.loads(report_path.read_text())
    cand, ref = report["candidate"], report["reference"]
    win = next((w for w in report.get("win_rates", []) if w["judge"] == "oracle" and w["opponent"] == "champion"), None)
    out: dict[str, Any] = {
        "candidate oracle": cand.get("oracle_mean"), "candidate KL": cand.get("kl"),
        "distinct-2": cand.get("distinct_2"),
        "distinct-2 / base": cand["distinct_2"] / ref["distinct_2"] if ref.get("distinct_2") else None,
        "rep-3 rise": (cand.get("repeated_trigram_rate") or 0.0) - (ref.get("repeated_trigram_rate") or 0.0),
        "oracle win vs champion": None if win is None else (win["rate"], win["lower"], win["upper"]),
        "base oracle": ref.get("oracle_mean"), "base distinct-2": ref.get("distinct_2"),
        "greedy looping": cand.get("greedy_looping_share"), "base greedy looping": ref.get("greedy_looping_share"),
        "greedy rise SE": report.get("greedy_loop_rise_se"), "greedy prompts": report.get("num_greedy_prompts"),
        "greedy looping (evaluated prompts)": cand.get("greedy_looping_share_evaluated"),
        "answers ending": cand.get("eos_share"),
    }
    summary = Path(cand["path"]).parent / "summary.json"
    if summary.exists():
        budget = json.loads(summary.read_text()).get("budget") or {}
        stop = budget.get("stop")
        out["budget stop"] = f"step {stop['kept_step']}" if stop else ("full" if budget else None)
    return out


@flow(name="closed-loop-demo", log_prints=True)
def closed_loop_demo(config: str | None = None, overrides: list[str] | None = None, rounds: int = 3) -> list[dict]:
    """Run ``rounds`` rounds of feedback → pipeline → (promotion). Returns one row per round."""
    cfg = load_pipeline_config(config, overrides)
    tracking.configure(cfg.home, cfg.pipeline.name)
    base = demo_base_model_task(cfg)
    landing = Path(ingest_settings(cfg).landing_dir)
    rows: list[dict[str, Any]] = []
    baseline = None
    for _ in range(rounds):
        with home_lock(cfg.home, cfg.pipeline.lock_wait_s):  # one writer: no other run simulates or ingests
            policy = champion_record(cfg) or base
            finish_simulated_landing(cfg)
            if (unfinished := unfinished_round(cfg, landing)) is not None:
                index, sim = unfinished
                print(f"round {index}: its feedback landed but the round never ended; finishing it with that feedback")
            else:
                index = next_round_index(landing)
                sim = simulate_feedback_task(cfg, policy, base, round_index=index)
            summary = alignment_pipeline(config=config, overrides=[*(overrides or []),
                                                                  *round_overrides(cfg, base.path, index)])
        evaluation = summary.get("evaluation") or {}
        baseline = evaluation.get("oracle base", baseline)
        version, oracle, kl, champion_base = champion_oracle(cfg)
        # the gain over the base on the prompts the champion was evaluated on (rounds may use other sets)
        base_of_champion = champion_base if champion_base is not None else baseline
        promoted = summary.get("status") == "promoted"
        registry = summary.get("registry") or {}
        figures = candidate_figures(round_report(cfg.home / "runs" / cfg.pipeline.name, registry))
        rows.append({"round": index, "feedback from": f"v{policy.registry_version}" if policy.registry_version
                     else "base", "rows": sim.get("rows"), "rejected samples": sim.get("rejected samples"),
                     "kept samples": sim.get("kept samples"), "draws": sim.get("draws"),
                     **feedback_figures(sim, summary),
                     "candidate oracle": evaluation.get("oracle cand"), **figures,
                     "promoted": promoted, "why not": None if promoted else _first_failure(registry.get("reasons")),
                     "champion": version, "oracle": oracle, "kl": kl,
                     "gain": None if oracle is None or base_of_champion is None else oracle - base_of_champion})
    _render(rows, baseline)
    folder = cfg.home / "runs" / cfg.pipeline.name
    champions = [r for r in rows if r["oracle"] is not None]
    plot = plot_closed_loop(champions, folder / "closed_loop.png", baseline=baseline) if champions else None
    rounds_plot = plot_loop_rounds(rows, folder / "closed_loop_rounds.png", baseline=baseline, max_kl=cfg.gate.max_kl)
    table = folder / "closed_loop_rounds.json"
    table.write_text(json.dumps({"base_oracle": baseline, "rounds": rows}, indent=2, default=str))
    experiment_id = tracking.configure(cfg.home, cfg.pipeline.name)
    run_id = tracking.start_parent_run(experiment_id, "closed-loop-demo", {"alignflow.stage": "demo"})
    for row in rows:
        tracking.log_metrics(run_id, {"demo/champion_oracle": row["oracle"] or 0.0, "demo/kl": row["kl"] or 0.0,
                                      **({"demo/champion_gain": row["gain"]} if row["gain"] is not None else {}),
                                      "demo/promoted": float(row["promoted"]),
                                      **{f"demo/candidate_{k}": float(row[key]) for k, key in
                                         (("oracle", "candidate oracle"), ("kl", "candidate KL"),
                                          ("distinct2_ratio", "distinct-2 / base"))
                                         if isinstance(row.get(key), (int, float))}}, step=row["round"])
    if baseline is not None:
        tracking.log_metrics(run_id, {"demo/base_oracle": baseline})
    for path in (plot, rounds_plot, table):
        if path is not None:
            tracking.log_artifact(run_id, path, "demo")
    tracking.end_run(run_id)
    create_table_artifact([{k: (str(v) if v is not None else "-") for k, v in r.items()} for r in rows],
                          key=f"{cfg.pipeline.name}-closed-loop".replace("_", "-"),
                          description="Champion oracle reward per round")
    print(f"closed-loop plot: {rounds_plot}")
    return rows


def _first_failure(reasons: list[str] | None) -> str | None:
    """The first failed rule of a gate verdict (reasons: the verdict, then each failed rule)."""
    reasons = reasons or []
    return (reasons[1] if len(reasons) > 1 else reasons[0])[:200] if reasons else None


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


LOOP_TABLE_WIDTH = 240
"""Columns of the closed-loop table when piped to a log: its 16 columns fit without cutting a figure."""


def greedy_cell(row: dict) -> str:
    """The candidate's greedy looping share with its rise over the base's and the rise's standard
    error: "53.4% (+6.8 ± 3.1)"; "-" when not measured."""
    share, base, se = row.get("greedy looping"), row.get("base greedy looping"), row.get("greedy rise SE")
    if share is None:
        return "-"
    rise = "" if base is None else f"{100 * (share - base):+.1f}" + ("" if se is None else f" ± {100 * se:.1f}")
    return f"{share:.1%}" + (f" ({rise})" if rise else "")


def _render(rows: list[dict], baseline: float | None, console=None) -> None:
    table = Table(title="closed-loop demo: candidate and champion per round (oracle on held-out prompts)")
    for col in ("round", "feedback from", "rows", "rejected", "budget stop", "cand. oracle", "cand. KL",
                "distinct-2 / base", "rep-3 rise", "greedy looping (rise ± SE)", "oracle win vs champion (95% CI)",
                "promoted", "champion", "oracle", "gain", "KL"):
        table.add_column(col)
    for r in rows:
        gain = _num(r.get("gain"), "+.3f")
        win = r.get("oracle win vs champion")
        table.add_row(str(r["round"]), r["feedback from"], str(r["rows"]), _num(r.get("rejected samples"), "d"),
                      str(r.get("budget stop") or "-"), _num(r.get("candidate oracle"), ".3f"),
                      _num(r.get("candidate KL"), ".2f"), _num(r.get("distinct-2 / base"), ".0%"),
                      _num(r.get("rep-3 rise"), "+.3f"), greedy_cell(r),
                      "-" if win is None else f"{win[0]:.2f} ({win[1]:.2f}–{win[2]:.2f})",
                      "yes" if r["promoted"] else "no", f"v{r['champion']}" if r["champion"] else "-",
                      _num(r["oracle"], ".3f"), gain, _num(r["kl"], ".2f"))
    console = console or report_console(piped_width=LOOP_TABLE_WIDTH)
    console.print(table)
    if baseline is not None:
        console.print(f"base model mean oracle sentiment: {baseline:.3f}")
