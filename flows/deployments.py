"""Scheduled deployments: retraining on a cron (a fast no-op when no new feedback arrived) and
monitoring (drift on new feedback; crossing a threshold triggers the retraining deployment).

``alignflow serve`` runs both in this process with Prefect's ``serve``; ``infra/prefect.yaml``
declares the same deployments for work pools in production.

Stopping ``serve``: SIGTERM (systemd, Kubernetes, ``docker stop``) or Ctrl-C. On SIGTERM the
runner pauses the schedules and stops in-flight flow runs (the next run on their home finishes
the round: a round is a transaction), the process prints one line (``alignflow serve: stopped``)
and exits 0; no traceback. A SIGTERM while the command is still importing (its first seconds)
ends it with 143 (the default action), before anything started. systemd's default
``KillMode=control-group`` sends SIGTERM to every process of the service at once, so the
embedded Prefect API (no ``PREFECT_API_URL``) runs in its own session, outside the process
group, and is stopped by ``serve`` after the runner has paused the schedules through it.
"""

from __future__ import annotations

import signal
import sys

from prefect import serve
from prefect.schedules import Cron

from flows.api_server import embedded_api
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


class _Stopped(Exception):
    """SIGTERM arrived before Prefect's runner installed its own handler."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise _Stopped


def serve_deployments(cfg: PipelineConfig, config_path: str | None, overrides: list[str]) -> None:
    """Serve the deployments until SIGTERM or Ctrl-C (see the module docstring); returns after a
    clean SIGTERM shutdown. Raises KeyboardInterrupt on Ctrl-C, RuntimeError when the embedded
    API cannot start."""
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with embedded_api(cfg.home):
            serve(*build_deployments(cfg, config_path, overrides))
    except _Stopped:
        pass
    except SystemExit as err:  # the runner's handler on a SIGTERM while it starts or stops
        if err.code not in (0, None):
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("alignflow serve: stopped", file=sys.stderr, flush=True)
