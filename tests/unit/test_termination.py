"""A SIGTERM is never lost (flows/termination.py): when the exception its handler raises is
dropped by Python (raised inside a finalizer), the request is still recorded, the next stage
boundary raises Prefect's TerminationSignal and the command exits 143. Real signals to this
process, main thread."""

from __future__ import annotations

import os
import signal
import sys

import pytest
from prefect.exceptions import TerminationSignal

from flows import termination


class _KillsOnFinalize:
    """Sends this process SIGTERM from its finalizer: the handler runs there, and Python reports
    the handler's exception as unraisable instead of raising it."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecodes, so the pending handler runs inside the finalizer
            pass


def _bridge(signum: int, frame: object) -> None:
    """Stands in for Prefect's bridge: raises its exception."""
    raise TerminationSignal(signum)


@pytest.fixture
def prefect_like_bridge():
    previous = signal.signal(signal.SIGTERM, _bridge)
    yield
    signal.signal(signal.SIGTERM, previous)
    termination.clear()


def test_a_sigterm_lost_in_a_finalizer_ends_the_run_at_the_next_stage_boundary(prefect_like_bridge, monkeypatch):
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda report: dropped.append(report.exc_type))
    with termination.remembered():
        termination.raise_if_requested()  # nothing yet
        _KillsOnFinalize()  # collected at once: its __del__ runs here
        assert dropped == [TerminationSignal], "the handler's exception was not the one Python dropped"
        with pytest.raises(TerminationSignal):
            termination.raise_if_requested()
    assert signal.getsignal(signal.SIGTERM) is _bridge  # the bridge is back after the flow


def test_a_sigterm_raised_normally_reaches_the_flows_handler_and_is_recorded(prefect_like_bridge):
    with pytest.raises(TerminationSignal), termination.remembered():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    assert termination.requested()
    assert signal.getsignal(signal.SIGTERM) is _bridge


def test_without_a_handler_to_chain_nothing_is_installed():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with termination.remembered():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_commands_handler_raises_terminated_then_forgets_when_the_command_ends():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(termination.Terminated), termination.command_handler():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    assert not termination.requested()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_the_signal_behind_an_error_raised_while_stopping_is_found():
    def raised_while_handling(first: BaseException) -> BaseException:
        try:
            try:
                raise first
            except BaseException:
                raise ConnectionError("[Errno 111] Connection refused")  # noqa: B904 - implicit chaining, as Prefect raises it
        except ConnectionError as err:
            return err

    err = raised_while_handling(termination.Terminated())
    assert isinstance(termination.signal_behind(err), termination.Terminated)
    assert type(termination.signal_behind(raised_while_handling(KeyboardInterrupt()))) is KeyboardInterrupt
    assert termination.signal_behind(raised_while_handling(ValueError("no signal"))) is None
    assert termination.signal_behind(ValueError("alone")) is None


_UNDELIVERABLE = """
import sys, time
from prefect.events import emit_event
import flows.api_server as api
from flows import termination
api.DRAIN_TIMEOUT_S = 2.0
emit_event(event="alignflow.test", resource={"prefect.resource.id": "alignflow.test"})
time.sleep(0.5)
started = time.monotonic()
try:
    termination.exit_code_after_signal(143)
finally:
    print(f"{time.monotonic() - started:.1f}", file=sys.stderr)
"""


def test_a_command_whose_prefect_api_is_gone_exits_after_a_bounded_drain(tmp_path):
    """Prefect's event worker holding an event for an API nobody answers (its server died with the
    signal): without the bound the interpreter's exit waits for its retries, minutes."""
    import socket
    import subprocess
    import time

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", PREFECT_HOME=str(tmp_path))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _UNDELIVERABLE], env=env, capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    elapsed = time.monotonic() - started
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "did not take the run's last logs and events within 2 s" in proc.stderr, proc.stderr[-2000:]
    assert elapsed < 60, f"{elapsed:.0f} s"
