"""Scheduled deployments: retraining on a cron (a fast no-op when no new feedback arrived) and
monitoring (drift on new feedback; crossing a threshold triggers the retraining deployment).

``alignflow serve`` runs both in this process with Prefect's ``serve``; ``infra/prefect.yaml``
declares the same deployments for work pools in production.
"""

from __future__ import annotations

from prefect import serve
from prefect.schedules import Cron

from flows.monitor import monitor_feedback
from flows.pipeline import alignment_pipeline
from tasks.config import PipelineConfig

RETRAIN_DEPLOYMENT = "retrain"
MONITOR_DEPLOYMENT = "monitor"


def build_deployments(cfg: PipelineConfig, config_path: str | None, overrides: list[str]) -> list:
    """The retraining and monitoring deployments for ``cfg`` (not yet served)."""
    params = {"config": config_path, "overrides": overrides}
    tags = ["alignflow", cfg.pipeline.name]
    retrain = alignment_pipeline.to_deployment(
        name=RETRAIN_DEPLOYMENT,
        schedules=[Cron(cfg.schedule.cron, timezone=cfg.schedule.timezone)],
        parameters={**params, "only_if_new_data": True},
        concurrency_limit=1,  # the landing ledger is append-only without locks: one round at a time
        tags=tags,
        description=f"Retrain {cfg.pipeline.name} when new feedback has landed.",
    )
    deployments = [retrain]
    if cfg.schedule.monitor_cron:
        deployments.append(monitor_feedback.to_deployment(
            name=MONITOR_DEPLOYMENT,
            schedules=[Cron(cfg.schedule.monitor_cron, timezone=cfg.schedule.timezone)],
            parameters=params,
            tags=tags,
            description=f"Drift checks on new {cfg.pipeline.name} feedback; triggers retraining.",
        ))
    return deployments


def serve_deployments(cfg: PipelineConfig, config_path: str | None, overrides: list[str]) -> None:
    """Serve the deployments until interrupted."""
    serve(*build_deployments(cfg, config_path, overrides))
