"""``alignflow serve`` stopped the way systemd stops it (SIGTERM to the whole process group)
shuts down cleanly: exit 0, its one line, no traceback, and no Prefect API server left behind
(issue 14). The real command in a subprocess against a temporary home; bounded in time."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "ALIGNFLOW_HOME"}
    return {**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout_s: float) -> re.Match | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        found = re.search(pattern, path.read_text(errors="replace"))
        if found:
            return found
        time.sleep(0.5)
    return None


def test_serve_stops_cleanly_on_sigterm_to_its_process_group(tmp_path):
    home = tmp_path / "home"
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--config", "configs/tiny.yaml",
                                 "--set", f"pipeline.home={home}"], cwd=REPO, env=_env(home), stdout=o, stderr=e,
                                start_new_session=True)  # its own group, as a service under systemd
    try:
        assert _wait_for(out, r"prefect deployment run", proc, 240), f"serve did not start:\n{err.read_text()[-3000:]}"
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = err.read_text()
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("alignflow serve: stopped") == 1
    api = re.search(r"embedded Prefect API at http://127\.0\.0\.1:(\d+)/api", stderr)
    assert api, stderr[-3000:]
    with socket.socket() as sock:  # the embedded API went with it
        assert sock.connect_ex(("127.0.0.1", int(api.group(1)))) != 0
