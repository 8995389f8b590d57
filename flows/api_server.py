"""The embedded Prefect API of a command (``serve``, ``run``, ``demo``) when no ``PREFECT_API_URL``
is set: a ``prefect server start`` on the home's database in its own session, stopped with the
command (see :func:`embedded_api`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tasks.launcher import die_with_parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DRAIN_TIMEOUT_S = 10.0
"""How long Prefect's log and event workers get to hand over what they hold when a command ends."""


def drain_prefect_services(timeout_s: float) -> bool:
    """Stop Prefect's log and event workers once what they hold is sent (they start again when
    next used); True when they finished within ``timeout_s``. Without this, the interpreter's
    exit waits for them with no limit, and against an API that is gone they retry for minutes."""
    try:
        from prefect._internal.concurrency.services import _QueueServiceBase
    except ImportError:  # Prefect moved it: leave them to the interpreter's exit
        return True
    _, pending = _QueueServiceBase.drain_all(timeout=timeout_s)
    return not pending


@contextmanager
def embedded_api(home: Path, timeout_s: float | None = None, command: str = "serve") -> Iterator[str | None]:
    """A Prefect API server on the home's database for ``command`` (``serve``, ``run``, ``demo``)
    when no Prefect API is configured (yields its URL; with ``PREFECT_API_URL`` set in the
    environment, a Prefect profile or a test harness, yields None and starts nothing).

    Unlike Prefect's temporary server it runs in its own session (``start_new_session``): a
    signal to the whole process group (systemd's stop, Ctrl-C in a terminal) reaches the command
    but not the API it still needs to pause its schedules or record its flow run as CRASHED
    (Prefect's temporary server died with the group, and its clients then retried it for minutes).
    It is terminated when the block exits (killed after 10 s), and Linux sends it SIGTERM if the
    command's process dies first (``PR_SET_PDEATHSIG``: a SIGKILL leaves no server behind).
    Raises RuntimeError, with the end of its log, when it does not answer within ``timeout_s``
    (default ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, at least 60 s)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():  # the environment, a profile, a test harness
        yield None
        return
    timeout_s = timeout_s or max(60.0, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_path = Path(os.environ.get("PREFECT_HOME", home / "prefect")) / f"{command}-api.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=die_with_parent)
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
        print(f"alignflow {command}: embedded Prefect API at {url} (log: {log_path})", file=sys.stderr, flush=True)
        os.environ["PREFECT_API_URL"] = url  # flow-run processes the runner starts inherit it
        try:
            with temporary_settings({PREFECT_API_URL: url}):
                try:
                    yield url
                finally:  # the last logs and events reach the server before it stops
                    drain_prefect_services(DRAIN_TIMEOUT_S)
        finally:
            os.environ.pop("PREFECT_API_URL", None)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
