"""One writer per pipeline home (issue 14, point 3)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tasks.lock import HomeBusy, home_lock, unique_suffix

HOLD = """
import sys, time
from tasks.lock import home_lock
with home_lock(sys.argv[1], purpose="holder test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(home, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(home), str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_exits_with_a_message_naming_the_holder(tmp_path):
    proc = _holder(tmp_path, 30)
    try:
        started = time.monotonic()
        with pytest.raises(HomeBusy, match=rf"in use by pid {proc.pid} .*holder test.*lock_wait_s"):
            with home_lock(tmp_path, wait_s=0.5):
                pass
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_waits_for_the_first_and_a_killed_holder_frees_the_home(tmp_path):
    proc = _holder(tmp_path, 1.5)
    started = time.monotonic()
    with home_lock(tmp_path, wait_s=60):
        assert time.monotonic() - started > 0.5  # it queued behind the holder
    proc.wait()
    proc = _holder(tmp_path, 300)
    os.kill(proc.pid, signal.SIGKILL)  # a crash: no cleanup code runs
    proc.wait()
    with home_lock(tmp_path, wait_s=0):  # the kernel released the lock with the process
        pass


def test_other_threads_of_one_process_are_serialised_and_the_holder_may_re_enter(tmp_path):
    errors = []

    def other_thread():
        try:
            with home_lock(tmp_path, wait_s=0.1):
                errors.append("entered")
        except HomeBusy as err:
            errors.append(err)

    with home_lock(tmp_path):
        with home_lock(tmp_path):  # the closed-loop demo: a round inside the demo's hold
            pass
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert len(errors) == 1 and isinstance(errors[0], HomeBusy)
    with home_lock(tmp_path, wait_s=0):  # released when the outer hold ends
        pass


def test_unique_suffixes_differ_within_a_process():
    assert len({unique_suffix() for _ in range(1000)}) == 1000
