"""The closed-loop demo: each round samples feedback from the current champion (simulated
annotators with the VADER oracle), runs the pipeline, which retrains and promotes only if the
gate passes, and records the champion's oracle reward. Ends with a table and a plot."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from rich.table import Table

from flows.pipeline import alignment_pipeline
from tasks import tracking
from tasks.config import load_pipeline_config
from tasks.evaluation.plots import plot_closed_loop
from tasks.lock import home_lock
from tasks.stages.data import ingest_settings
from tasks.stages.demo import demo_base_model_task, simulate_feedback_task
from tasks.stages.models import champion_record
from tasks.stages.summary import report_console


def next_round_index(landing: Path) -> int:
    """One past the highest simulated round already in the landing folder."""
    found = [int(m.group(1)) for p in landing.glob("round*-*") if (m := re.match(r"round(\d+)-", p.name))]
    return max(found) + 1 if found else 0


def champion_oracle(cfg) -> tuple[str | None, float | None, float | None]:
    """(version, oracle mean, KL to base) of the champion, from its evaluation tags."""
    name = tracking.policy_model_name(cfg.pipeline.name)
    version = tracking.alias_version(name, tracking.CHAMPION)
    if version is None:
        return None, None, None
    tags = tracking.version_tags(name, version)
    oracle, kl = tags.get("alignflow.eval.oracle_mean"), tags.get("alignflow.eval.kl")
    return version, float(oracle) if oracle else None, float(kl) if kl else None


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
            index = next_round_index(landing)
            policy = champion_record(cfg) or base
            sim = simulate_feedback_task(cfg, policy, base, round_index=index)
            summary = alignment_pipeline(config=config, overrides=overrides)
        evaluation = summary.get("evaluation") or {}
        baseline = evaluation.get("oracle base", baseline)
        version, oracle, kl = champion_oracle(cfg)
        rows.append({"round": index, "feedback from": f"v{policy.registry_version}" if policy.registry_version
                     else "base", "rows": sim["rows"], "candidate oracle": evaluation.get("oracle cand"),
                     "promoted": summary.get("status") == "promoted", "champion": version,
                     "oracle": oracle, "kl": kl})
    _render(rows, baseline)
    plot = plot_closed_loop([r for r in rows if r["oracle"] is not None],
                            cfg.home / "runs" / cfg.pipeline.name / "closed_loop.png", baseline=baseline)
    experiment_id = tracking.configure(cfg.home, cfg.pipeline.name)
    run_id = tracking.start_parent_run(experiment_id, "closed-loop-demo", {"alignflow.stage": "demo"})
    for row in rows:
        tracking.log_metrics(run_id, {"demo/champion_oracle": row["oracle"] or 0.0, "demo/kl": row["kl"] or 0.0,
                                      "demo/promoted": float(row["promoted"])}, step=row["round"])
    if baseline is not None:
        tracking.log_metrics(run_id, {"demo/base_oracle": baseline})
    tracking.log_artifact(run_id, plot, "demo")
    tracking.end_run(run_id)
    create_table_artifact([{k: (str(v) if v is not None else "-") for k, v in r.items()} for r in rows],
                          key=f"{cfg.pipeline.name}-closed-loop".replace("_", "-"),
                          description="Champion oracle reward per round")
    print(f"closed-loop plot: {plot}")
    return rows


def _render(rows: list[dict], baseline: float | None) -> None:
    table = Table(title="closed-loop demo: champion's mean oracle sentiment per round")
    for col in ("round", "feedback from", "rows", "candidate oracle", "promoted", "champion", "oracle", "gain", "KL"):
        table.add_column(col)
    for r in rows:
        gain = "-" if r["oracle"] is None or baseline is None else f"{r['oracle'] - baseline:+.3f}"
        table.add_row(str(r["round"]), r["feedback from"], str(r["rows"]),
                      "-" if r["candidate oracle"] is None else f"{r['candidate oracle']:.3f}",
                      "yes" if r["promoted"] else "no", f"v{r['champion']}" if r["champion"] else "-",
                      "-" if r["oracle"] is None else f"{r['oracle']:.3f}", gain,
                      "-" if r["kl"] is None else f"{r['kl']:.2f}")
    console = report_console()
    console.print(table)
    if baseline is not None:
        console.print(f"base model mean oracle sentiment: {baseline:.3f}")
