"""SIGTERM (``kill PID``, ``docker stop``, Kubernetes): raised in the main thread like Ctrl-C, and
never lost.

Raised, because Prefect stops its temporary API server from an ``atexit`` hook, which a process
killed by the default SIGTERM action never runs (the server was left running). The exception
unwinds the command: a flow run in progress is marked CRASHED by Prefect's own SIGTERM bridge
(which hands the signal back to the command's handler), a training child is stopped by the
launcher, and the process exits 143 after the server stops. The next run on the home finishes the
round, as after any crash.

Remembered, because Python drops an exception that a signal handler raises while the main thread
runs a finalizer (a ``__del__``, a weakref callback, a generator closed by the garbage collector):
it prints "Exception ignored in ..." and carries on. A SIGTERM once let a round run to the end and
exit 0 in CI. So every handler here also records the request, the pipeline checks it at each stage
boundary (:func:`raise_if_requested`), and the command checks it when it returns: a lost exception
costs at most the rest of one stage.

Signals are the main thread's: off it, these install nothing.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_requested = threading.Event()


class Terminated(KeyboardInterrupt):
    """The command's SIGTERM, raised in the main thread (a KeyboardInterrupt, so code that lets
    Ctrl-C through lets it through too)."""


def requested() -> bool:
    """Whether a SIGTERM reached this process since :func:`clear` (whatever became of its exception)."""
    return _requested.is_set()


def clear() -> None:
    """Forget a request (the command that received it has ended)."""
    _requested.clear()


def raise_terminated(signum: int, frame: object) -> None:
    """The command's SIGTERM handler: record the request and raise :class:`Terminated`. A second
    SIGTERM ends the process at once (the default action is put back first)."""
    _requested.set()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def command_handler() -> Iterator[None]:
    """:func:`raise_terminated` as the SIGTERM handler for the body; the previous one after it, and
    the request forgotten (the next command in this process starts clean)."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        clear()


@contextmanager
def remembered() -> Iterator[None]:
    """Inside a flow run: keep the handler in place (Prefect's bridge, which raises its
    ``TerminationSignal``) and record each SIGTERM before calling it, so
    :func:`raise_if_requested` can end the run if the handler's exception is lost. The handler
    found is put back after the body. A default or ignored disposition is left as it is."""
    found = signal.getsignal(signal.SIGTERM) if _in_main_thread() else None
    if not callable(found):
        yield
        return
    handler: Callable[[int, Any], Any] = found

    def remember_then_handle(signum: int, frame: Any) -> Any:
        _requested.set()
        return handler(signum, frame)

    signal.signal(signal.SIGTERM, remember_then_handle)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is remember_then_handle:
            signal.signal(signal.SIGTERM, handler)


def raise_if_requested() -> None:
    """At a stage boundary of a flow run: raise Prefect's ``TerminationSignal`` if a SIGTERM came
    and its exception was lost. Prefect handles it as it handles its own (the flow run CRASHED, the
    signal handed on to the command's handler)."""
    if _requested.is_set():
        from prefect.exceptions import TerminationSignal

        raise TerminationSignal(signal.SIGTERM)


def signal_behind(err: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM (:class:`Terminated`) an exception was raised while handling, if any
    (its ``__context__``/``__cause__`` chain): with a signal to the whole group, Prefect's crash
    handling meets its dead API server and raises a connection error over the signal's exception."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def exit_code_after_signal(code: int) -> int:
    """The exit code of a command a signal ended, once Prefect's log and event workers have handed
    over what they hold; past :data:`~flows.api_server.DRAIN_TIMEOUT_S` the process ends here
    with ``code``.

    A signal to the whole process group (systemd's default stop, Ctrl-C in a terminal) also stops
    Prefect's temporary API server where a command uses one, and at interpreter exit those workers
    retry the dead server for minutes before the process can end (seen: 2.5 minutes after
    ``kill -TERM -PGID``). So they get a bounded wait; past it the exit handlers run now (they stop
    the temporary server if it still runs) and :func:`os._exit` skips the workers' wait. Against a
    live API they finish at once and the process exits as usual."""
    from flows.api_server import DRAIN_TIMEOUT_S, drain_prefect_services

    if drain_prefect_services(DRAIN_TIMEOUT_S):
        return code
    print(f"alignflow: Prefect's API did not take the run's last logs and events within {DRAIN_TIMEOUT_S:.0f} s "
          "(its server stopped with the signal); exiting without them", file=sys.stderr)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
