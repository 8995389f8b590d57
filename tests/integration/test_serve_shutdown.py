"""Commands stopped by SIGTERM leave no Prefect API server behind.

``alignflow serve`` stopped the way systemd stops it (SIGTERM to the whole process group) shuts
down cleanly: exit 0, its one line, no traceback (issue 14); ``alignflow run`` stopped that way
exits 143 within seconds, not minutes, its flow run CRASHED. ``alignflow run`` stopped mid-round
by a SIGTERM to its own pid (``kill PID``, ``docker stop``: the signal reaches the main process
only) exits 143 with one line, its flow run CRASHED, and the temporary server Prefect started for it stops with it
(it used to be left running: Prefect stops it from an ``atexit`` hook, which the default SIGTERM
action skips). The real commands in subprocesses against temporary homes; bounded in time."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
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


def _start(tmp_path: Path, command: str) -> tuple[subprocess.Popen, Path, Path, Path]:
    """``alignflow COMMAND`` on the tiny config in a fresh home, in its own process group (as a
    service under systemd); returns the process, the home and its stdout and stderr files."""
    home = tmp_path / "home"
    out, err = tmp_path / f"{command}.out", tmp_path / f"{command}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", command, "--config", "configs/tiny.yaml",
                                 "--set", f"pipeline.home={home}"], cwd=REPO, env=_env(home), stdout=o, stderr=e,
                                start_new_session=True)
    return proc, home, out, err


@contextmanager
def _reaped(proc: subprocess.Popen) -> Iterator[None]:
    """SIGKILL the command's process group on the way out if it still runs (a failed step included)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_stops_cleanly_on_sigterm_to_its_process_group(tmp_path):
    proc, _, out, err = _start(tmp_path, "serve")
    with _reaped(proc):
        assert _wait_for(out, r"prefect deployment run", proc, 240), f"serve did not start:\n{err.read_text()[-3000:]}"
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=90)
    stderr = err.read_text()
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.count("alignflow serve: stopped") == 1
    api = re.search(r"embedded Prefect API at http://127\.0\.0\.1:(\d+)/api", stderr)
    assert api, stderr[-3000:]
    with socket.socket() as sock:  # the embedded API went with it
        assert sock.connect_ex(("127.0.0.1", int(api.group(1)))) != 0


def _round_began(proc: subprocess.Popen, home: Path, err: Path) -> list[psutil.Process]:
    """Wait until the command's flow run has begun (its mark); returns the Prefect API server it
    started (flows/api_server.py)."""
    marks = home / ".alignflow-flows"  # a flow run's mark (tasks/round.py): the round has begun
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not (marks.is_dir() and any(marks.iterdir())):
        time.sleep(0.2)
    assert proc.poll() is None and any(marks.iterdir()), f"no flow run began:\n{err.read_text()[-3000:]}"
    servers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if re.search(r"uvicorn|prefect server start", " ".join(p.cmdline()))]
    assert servers, "the run started no Prefect API server"
    return servers


def test_run_stopped_by_sigterm_to_its_process_group_exits_143_within_seconds(tmp_path):
    """systemd's default stop (and Ctrl-C's SIGINT in a terminal) signals the whole group. Prefect's
    temporary server died with the run, the flow run was never marked CRASHED, and the exit waited
    1-3 minutes while Prefect's clients retried the dead server. The run's API now lives in its own
    session (flows/api_server.py) and stops after the run has recorded the crash."""
    proc, home, _, err = _start(tmp_path, "run")
    with _reaped(proc):
        servers = _round_began(proc, home, err)
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=90)
        elapsed = time.monotonic() - started
        _, left = psutil.wait_procs(servers, timeout=15)
    stderr = err.read_text()
    assert code == 143, stderr[-3000:]
    assert stderr.count("alignflow: terminated (SIGTERM)") == 1, stderr[-3000:]
    assert elapsed < 45, f"{elapsed:.0f} s from the signal to the exit"
    assert not left
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        assert [state for (state,) in db.execute("SELECT state_type FROM flow_run")] == ["CRASHED"]


def test_run_stopped_by_sigterm_to_its_pid_exits_143_and_takes_its_prefect_server_with_it(tmp_path):
    proc, home, _, err = _start(tmp_path, "run")
    with _reaped(proc):
        servers = _round_began(proc, home, err)
        os.kill(proc.pid, signal.SIGTERM)  # the main process only
        code = proc.wait(timeout=120)
        _, left = psutil.wait_procs(servers, timeout=15)
    for server in left:
        server.kill()
    stderr = err.read_text()
    clues = "\n".join(line for line in stderr.splitlines()
                      if re.search(r"Exception ignored|Traceback|Termination|SIGTERM|Crash", line))
    assert code == 143, f"{clues}\n...\n{stderr[-3000:]}"
    assert stderr.count("alignflow: terminated (SIGTERM)") == 1, f"{clues}\n...\n{stderr[-3000:]}"
    assert not left, f"the temporary Prefect server outlived the run: {[p.pid for p in left]}"
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:  # the embedded server's database, in the home
        assert [state for (state,) in db.execute("SELECT state_type FROM flow_run")] == ["CRASHED"]


def test_monitor_stopped_by_sigterm_to_its_process_group_exits_143_its_flow_run_crashed(tmp_path):
    """``alignflow monitor`` (the one short command that runs a flow) used Prefect's temporary server,
    which a signal to the group took down first. It now uses the embedded API as ``run`` does. Held
    mid-flow by a round that holds the home (the check waits for its lock), then signalled."""
    home = tmp_path / "home"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tasks.lock import home_lock\n"
                               "with home_lock(sys.argv[1], purpose='run'):\n    print('held', flush=True)\n"
                               "    time.sleep(120)\n", str(home)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = tmp_path / "monitor.err"
        with open(tmp_path / "monitor.out", "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "monitor", "--config", "configs/tiny.yaml",
                                     "--set", f"pipeline.home={home}", "--set", "pipeline.lock_wait_s=300"],
                                    cwd=REPO, env=_env(home), stdout=o, stderr=e, start_new_session=True)
        with _reaped(proc):
            servers = _round_began(proc, home, err)  # its flow run's mark: waiting for the home
            started = time.monotonic()
            os.killpg(proc.pid, signal.SIGTERM)
            code = proc.wait(timeout=90)
            elapsed = time.monotonic() - started
            _, left = psutil.wait_procs(servers, timeout=15)
    finally:
        holder.kill()
        holder.wait()
    stderr = err.read_text()
    assert code == 143, stderr[-3000:]
    assert stderr.count("alignflow: terminated (SIGTERM)") == 1 and "finishes the round" not in stderr, stderr[-3000:]
    assert "embedded Prefect API at" in stderr
    assert elapsed < 45, f"{elapsed:.0f} s from the signal to the exit"
    assert not left
    with sqlite3.connect(home / "prefect" / "prefect.db") as db:
        assert [state for (state,) in db.execute("SELECT state_type FROM flow_run")] == ["CRASHED"]
