"""Flow runs killed before their round record names them, and the commands that share the home's lock
(issue 14, points 1 and 3).

A flow run writes a mark in the home (tasks/round.py, :class:`FlowMarks`) before it waits for the
home's lock; the next lock holder closes the flow run of every mark whose process is dead (CRASHED)
through the same path as a dead round's (:func:`close_dead_flow_runs`). The integration test kills a
real ``alignflow run`` (SIGKILL) while it waits for the lock, and the next ``alignflow run`` closes it;
while the test holds the lock, ``alignflow monitor`` exits 75 naming the holder, and ``alignflow
ingest FILE`` (a check: it writes no pipeline state) does not wait.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tasks.round as round_module
from tasks.lock import home_lock
from tasks.round import FLOW_MARKS, FlowMark, FlowMarks, close_dead_flow_runs, process_alive, process_start
from tests.integration.pipeline_helpers import REPO, TINY
from tests.tiny_models import make_tiny_model


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_process_is_dead_when_its_pid_is_gone_or_reused_and_alive_otherwise():
    me, started = os.getpid(), process_start(os.getpid())
    assert started is not None  # Linux /proc
    assert process_alive(me, socket.gethostname(), started)
    assert not process_alive(_dead_pid(), socket.gethostname(), None)
    assert not process_alive(me, socket.gethostname(), started + 1)  # this pid now belongs to another process
    assert process_alive(_dead_pid(), "another-host", None)  # cannot be checked from here: left alone


def test_a_mark_lives_exactly_as_long_as_its_flow_run_and_only_dead_ones_are_closed(tmp_path, monkeypatch):
    marks = FlowMarks(tmp_path)
    with marks.mark("live-run", "alignment-pipeline") as path:
        record = json.loads(path.read_text())
        assert record["flow_run_id"] == "live-run" and record["pid"] == os.getpid()
        assert record["process_start"] == process_start(os.getpid())
        assert [p.name for p in (tmp_path / FLOW_MARKS).iterdir()] == [path.name]  # no temp file left
    assert not path.exists()
    with pytest.raises(RuntimeError), marks.mark("failing-run", "alignment-pipeline") as path:
        raise RuntimeError("a stage failed")
    assert not path.exists()  # an exception is not a crash: the flow run ends FAILED by itself
    with marks.mark(None, "alignment-pipeline") as path:
        assert path is None  # outside a flow run there is nothing to close

    def plant(name: str, **fields) -> Path:
        path = tmp_path / FLOW_MARKS / f"{name}.json"
        path.write_text(FlowMark(flow_run_id=name, flow="alignment-pipeline", **fields).model_dump_json())
        return path

    dead = plant("dead", pid=_dead_pid())
    reused = plant("reused", process_start=(process_start(os.getpid()) or 0) + 1)
    waiting = plant("waiting", process_start=process_start(os.getpid()))  # a live run waiting for the lock
    elsewhere = plant("elsewhere", pid=_dead_pid(), host="another-host")
    (tmp_path / FLOW_MARKS / "torn.json").write_text('{"flow_run_id": "x", "fl')
    ended_elsewhere = plant("ended-elsewhere", host="another-host")
    closed: list[list[str]] = []
    monkeypatch.setattr(round_module, "close_stale_flow_runs", lambda ids, message: closed.append(ids) or ids)
    asked: list[list[str]] = []
    monkeypatch.setattr(round_module, "ended_flow_runs", lambda ids: asked.append(ids) or ["ended-elsewhere"])
    crashed = close_dead_flow_runs(tmp_path, {"dead-round", "mine"}, keep="mine")
    assert closed == [["dead", "dead-round", "reused"]] and crashed == closed[0]
    assert asked == [["elsewhere", "ended-elsewhere"]]  # another host's: removed once its flow run has ended
    assert not dead.exists() and not reused.exists() and waiting.exists() and elsewhere.exists()
    assert not ended_elsewhere.exists()


# ----------------------------------------------------------------------------- real processes
# (``prefect_api_url``: the session's Prefect test server, tests/conftest.py)


def _env(api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "ALIGNFLOW_FAULT"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PREFECT_API_URL=api_url)
    return env


def _cli(command: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", command, "--config", str(config), *extra]


def _config(tmp_path: Path) -> tuple[Path, Path]:
    """(home, config file): the tiny pipeline on a configured tiny model (no demo), so a run with
    nothing new stops at no-new-data without building anything."""
    home = tmp_path / "home"
    config = yaml.safe_load(Path(TINY).read_text())
    del config["demo"]
    config["pipeline"]["home"] = str(home)
    config["model"] = {"policy": {"name_or_path": str(make_tiny_model(tmp_path / "model", "llama"))}}
    config["evaluation"].update(max_prompt_length=16, max_length=48)  # the tiny model has 128 positions
    cfg_path = tmp_path / "tiny-model.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    return home, cfg_path


def _flow_state(flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.fault
def test_a_run_killed_while_waiting_for_the_lock_is_closed_by_the_next_and_monitor_shares_the_lock(
        tmp_path, prefect_api_url):
    home, cfg_path = _config(tmp_path)
    feedback = tmp_path / "check.jsonl"
    feedback.write_text("".join(json.dumps({"prompt": f"p{i}", "response_a": "good", "response_b": "bad",
                                            "choice": "a"}) + "\n" for i in range(4)))
    env, marks = _env(prefect_api_url), home / FLOW_MARKS
    with home_lock(home, purpose="test holder"):
        waiting = subprocess.Popen(_cli("run", cfg_path, "--set", "pipeline.lock_wait_s=600"), cwd=REPO, env=env,
                                   stdout=(tmp_path / "waiting.log").open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            # the monitor and the check are independent of each other: side by side
            busy = subprocess.Popen(_cli("monitor", cfg_path), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            check = subprocess.Popen(_cli("ingest", cfg_path, str(feedback)), cwd=REPO, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out, check_out = busy.communicate(timeout=300)[0], check.communicate(timeout=300)[0]
            assert busy.returncode == 75 and f"in use by pid {os.getpid()}" in out and "test holder" in out, out[-3000:]
            assert check.returncode == 0, check_out[-3000:]
            assert not (home / "data").exists()  # a check writes no ledger and no validated store
            deadline = time.monotonic() + 240
            while not list(marks.glob("*.json")) and time.monotonic() < deadline and waiting.poll() is None:
                time.sleep(0.5)
            [mark] = list(marks.glob("*.json"))
            flow_run_id = json.loads(mark.read_text())["flow_run_id"]
            time.sleep(1.0)
            assert waiting.poll() is None and _flow_state(flow_run_id) == "RUNNING"  # waiting for the lock
        finally:
            os.killpg(waiting.pid, signal.SIGKILL)  # a crash: no finally, no atexit
            waiting.wait()
    assert waiting.returncode == -9 and mark.exists()
    assert not (home / "data" / "tiny" / "round.json").exists()  # it never wrote a round record
    assert _flow_state(flow_run_id) == "RUNNING"

    nxt = subprocess.run(_cli("run", cfg_path, "--only-if-new-data"), cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert nxt.returncode == 0 and "no-new-data" in nxt.stdout + nxt.stderr, nxt.stdout[-3000:] + nxt.stderr[-3000:]
    assert _flow_state(flow_run_id) == "CRASHED"
    assert round_module.ended_flow_runs([flow_run_id, "not-a-uuid"]) == [flow_run_id]  # what another host's mark waits for
    assert list(marks.iterdir()) == []  # the dead mark removed, the next run's own gone with it


HOLD = """
import sys, time
from tasks.lock import home_lock
with home_lock(sys.argv[1], purpose=sys.argv[2]):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _holder(home: Path, purpose: str, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(home), purpose, str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_waits_for_a_monitor_check_but_not_for_another_run(tmp_path):
    from tasks.lock import HomeBusy

    proc = _holder(tmp_path, "monitor", 2.0)
    try:
        started = time.monotonic()
        with home_lock(tmp_path, wait_s=0):  # the nightly run that fires at the monitor's minute
            assert time.monotonic() - started > 1.0  # it queued behind the check instead of skipping its turn
    finally:
        proc.kill()
        proc.wait()
    proc = _holder(tmp_path, "run", 60.0)
    try:
        started = time.monotonic()
        with pytest.raises(HomeBusy, match=rf"in use by pid {proc.pid} .*\(run, since .*waited 0 s"):
            with home_lock(tmp_path, wait_s=0):
                pass
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.integration
def test_a_scheduled_monitor_skips_its_turn_on_a_busy_home_and_the_command_refuses(tmp_path, prefect_api_url,
                                                                                     monkeypatch):
    import flows.monitor as monitor_module
    from tasks.lock import HomeBusy

    home, cfg_path = _config(tmp_path)
    proc = _holder(home, "run", 120.0)
    try:
        with pytest.raises(HomeBusy, match=rf"in use by pid {proc.pid}"):  # `alignflow monitor`: exit 75
            monitor_module.monitor_feedback(config=str(cfg_path))
        monkeypatch.setattr(monitor_module.deployment, "get_id", lambda: "a-deployment")
        started = time.monotonic()
        assert monitor_module.monitor_feedback(config=str(cfg_path)) is None  # skipped, not failed
        assert time.monotonic() - started < 60
    finally:
        proc.kill()
        proc.wait()
    assert list((home / FLOW_MARKS).glob("*.json")) == []  # both runs' marks gone with them
