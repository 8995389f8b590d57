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

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
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


class _Stopped(Exception):
    """SIGTERM arrived before Prefect's runner installed its own handler."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise _Stopped


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def embedded_api(home: Path, timeout_s: float | None = None) -> Iterator[str | None]:
    """A Prefect API server on the home's database for ``serve`` when ``PREFECT_API_URL`` is unset
    (yields its URL; with the variable set, yields None and starts nothing).

    Unlike Prefect's temporary server it runs in its own session (``start_new_session``): a
    SIGTERM to the whole process group reaches the runner but not the API the runner still needs
    to pause its schedules. It is terminated when the block exits (killed after 10 s).
    Raises RuntimeError, with the end of its log, when it does not answer within ``timeout_s``
    (default ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, at least 60 s)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    timeout_s = timeout_s or max(60.0, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = Path(os.environ.get("PREFECT_HOME", home / "prefect")) / "serve-api.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the embedded Prefect API did not start (see {log_path}):\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(f"alignflow serve: embedded Prefect API at {url} (log: {log_path})", file=sys.stderr, flush=True)
        os.environ["PREFECT_API_URL"] = url  # flow-run processes the runner starts inherit it
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
