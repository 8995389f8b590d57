"""The monitoring flow: on each new feedback batch (landing files not yet ingested), measure
drift against the feedback the champion was trained on, and the champion reward model's
accuracy on the new human labels. Crossing a threshold triggers the retraining deployment,
recorded with the reason (MLflow tags + Prefect artifact)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment, flow_run

from tasks import tracking
from tasks.config import PipelineConfig, load_pipeline_config
from tasks.data.handoff import read_validated_kind, validated_root
from tasks.data.landing import ledger_for, pending_sources, read_and_validate
from tasks.lock import HomeBusy, home_lock
from tasks.round import FlowMarks, close_dead_flow_runs
from tasks.stages.data import data_dir, ingest_settings
from tasks.trusted import check_deployment_run


def _largest_kind(frames: dict[str, pd.DataFrame]) -> str | None:
    usable = {k: f for k, f in frames.items() if len(f)}
    if not usable:
        return None
    return "pairwise" if "pairwise" in usable else max(usable, key=lambda k: len(usable[k]))


def _reward_scorer(cfg, device: str = "cpu"):
    """The champion reward model as a scorer, or None when none is registered."""
    from tasks.evaluation.suite import reward_scorer_from_folder

    name = tracking.reward_model_name(cfg.pipeline.name)
    version = tracking.alias_version(name, tracking.CHAMPION)
    if version is None:
        return None
    folder = tracking.download_model(name, version, cfg.home / "registry-cache" / name / version)
    return reward_scorer_from_folder(folder, device)


def trigger_retraining(deployment: str, reason: str) -> str:
    """Start the retraining deployment without waiting; returns the new flow run's id."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, timeout=0, tags=["drift-triggered"], as_subflow=False,
                         flow_run_name=f"drift: {reason[:60]}")
    return str(run.id)


@flow(name="monitor-feedback", log_prints=True)
def monitor_feedback(config: str | None = None, overrides: list[str] | None = None) -> dict[str, Any] | None:
    """Check new feedback for drift. Returns the drift report dict, or None when nothing new arrived.
    A deployment run whose parameters set code-executing settings is refused (tasks/trusted.py).
    Holds the home's lock as ``run`` does (it reads the ledger and the validated store, writes
    MLflow runs and the registry cache): raises HomeBusy after ``pipeline.lock_wait_s``; a scheduled
    (deployment) run skips its turn instead, with a warning, and returns None. A run that finds a
    monitor check holding the home waits for it (tasks/lock.py, BRIEF_HOLDERS)."""
    check_deployment_run(config, overrides)
    cfg = load_pipeline_config(config, overrides)
    try:
        with FlowMarks(cfg.home).mark(flow_run.get_id(), "monitor-feedback"), \
                home_lock(cfg.home, cfg.pipeline.lock_wait_s, purpose="monitor"):
            close_dead_flow_runs(cfg.home, keep=str(flow_run.get_id() or ""))
            return check_drift(cfg)
    except HomeBusy as err:
        if not deployment.get_id():  # `alignflow monitor`: exit 75 naming the holder
            raise
        get_run_logger().warning("Skipped this check: %s The round holding the home ingests the new files; the next "
                                 "scheduled check looks again.", err)  # not an hourly failure during training
        return None


def check_drift(cfg: PipelineConfig) -> dict[str, Any] | None:
    """The monitoring flow's body, under the home's lock (see :func:`monitor_feedback`)."""
    logger = get_run_logger()
    settings = ingest_settings(cfg)
    pending, _ = pending_sources(settings, ledger_for(settings, data_dir(cfg)))
    if not pending:
        logger.info("No new feedback files: nothing to monitor.")
        return None
    new = read_and_validate([p.options for p in pending], settings, [p.digest for p in pending]).valid
    kind = _largest_kind(new)
    reference = read_validated_kind(validated_root(data_dir(cfg)), kind) if kind else None
    if reference is None:
        logger.info("No reference feedback of kind %s yet (first batch): nothing to compare.", kind)
        return None
    from tasks.evaluation.drift import monitor_batch  # torch: imported only when there is a batch to compare

    report = monitor_batch(new[kind], reference, cfg.monitor, _reward_scorer(cfg), seed=cfg.pipeline.seed)
    experiment_id = tracking.configure(cfg.home, cfg.pipeline.name)
    run_id = tracking.start_parent_run(experiment_id, "monitor", {"alignflow.stage": "monitor",
                                                                   "alignflow.kind": kind})
    triggered_run = None
    try:
        tracking.log_metrics(run_id, report.metrics())
        tags = {"alignflow.drift": "triggered" if report.triggered else "quiet",
                "alignflow.drift_reasons": " | ".join(report.reasons)[:5000]}
        if report.triggered and cfg.monitor.trigger_deployment:
            try:
                triggered_run = trigger_retraining(cfg.monitor.trigger_deployment, "; ".join(report.reasons))
                tags["alignflow.triggered_flow_run"] = triggered_run
            except Exception as err:  # noqa: BLE001 - the deployment may not exist outside `serve`
                tags["alignflow.trigger_error"] = str(err)[:500]
                logger.warning("Drift found but the retraining deployment could not be started: %s", err)
        tracking.set_tags(run_id, tags)
    finally:
        tracking.end_run(run_id)
    create_markdown_artifact(report.to_markdown(), key=f"{cfg.pipeline.name}-drift".replace("_", "-"),
                             description="Feedback drift report")
    result = {"triggered": report.triggered, "reasons": report.reasons, "kind": kind, "rows": len(new[kind]),
              "retraining_flow_run": triggered_run, "metrics": report.metrics()}
    logger.info("Drift %s: %s", "TRIGGERED" if report.triggered else "quiet", "; ".join(report.reasons) or "-")
    return result
