"""One writer per pipeline home: an exclusive file lock held for a whole round.

Two runs on one home would simulate and ingest the same feedback, train in the same run
folders and race on the registry's aliases. :func:`home_lock` takes ``<home>/.alignflow.lock``
(the ``filelock`` library: ``flock`` on POSIX, so the kernel releases it when the holder dies,
even by SIGKILL: a crash never leaves a stale lock). A second run waits up to
``pipeline.lock_wait_s`` and then raises :class:`HomeBusy`, naming the holder from
``<home>/.alignflow.lock.json`` (pid, host, command, since when).

Assumption: the home is on a file system with working ``flock`` (local disks; NFS v4 and most
Kubernetes ReadWriteMany volumes). Against shared servers, Prefect's concurrency limits
(``registry``, ``gpu``) serialise what several homes share.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".alignflow.lock"
HOLDER_NAME = ".alignflow.lock.json"


class HomeBusy(RuntimeError):
    """Another process holds the home's lock."""


BRIEF_HOLDERS: dict[str, float] = {"monitor": 600.0}
"""Holders (by ``purpose``) that finish in minutes, and how long anyone waits for one even when
told to wait less: the hourly monitor check must not make the nightly run that fires at the same
minute skip its turn (with ``lock_wait_s`` 0 it would)."""


_HELD: dict[str, int] = {}
"""Homes this process holds: resolved path -> the holding thread's id (it may re-enter; the
outermost ``home_lock`` releases)."""
_HELD_GUARD = threading.Lock()


def holder(home: str | Path) -> dict:
    """What the current (or last) holder wrote about itself; {} when unknown."""
    try:
        return json.loads((Path(home) / HOLDER_NAME).read_text())
    except (OSError, ValueError):
        return {}


def unique_suffix() -> str:
    """A name part no other process or call uses at the same time (pid, time, random)."""
    return f"{os.getpid()}-{time.monotonic_ns()}-{os.urandom(3).hex()}"


def _acquire(lock: FileLock, home: Path, wait_s: float) -> None:
    """Take ``lock`` within ``wait_s`` seconds (longer behind a :data:`BRIEF_HOLDERS` holder), or
    raise HomeBusy naming the holder."""
    waited = wait_s
    try:
        lock.acquire(timeout=wait_s)
        return
    except Timeout:
        brief = BRIEF_HOLDERS.get(holder(home).get("purpose", ""), 0.0)
    if brief > wait_s:
        try:
            lock.acquire(timeout=brief - wait_s)
            return
        except Timeout:
            waited = brief
    info = holder(home)
    who = (f"pid {info.get('pid')} on {info.get('host')} ({info.get('purpose')}, since {info.get('since')}: "
           f"{info.get('command')})" if info else "another process")
    raise HomeBusy(f"the pipeline home {home} is in use by {who}; waited {waited:g} s. One run per home at a "
                   f"time: wait for it, or raise pipeline.lock_wait_s to queue behind it.") from None


@contextmanager
def home_lock(home: str | Path, wait_s: float = 0.0, purpose: str = "run") -> Iterator[Path]:
    """Hold the home's lock for the body. Yields the lock file.

    Raises HomeBusy after ``wait_s`` seconds when another process (or another thread of this
    one) holds it; behind a brief holder (:data:`BRIEF_HOLDERS`, the monitor check) it waits up to
    that holder's time instead, if longer. Re-entrant in the holding thread: the closed-loop demo holds it around a
    round whose pipeline flow takes it again.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / LOCK_NAME
    key, me = str(home.resolve()), threading.get_ident()
    with _HELD_GUARD:
        reentered = _HELD.get(key) == me
    if reentered:
        yield path
        return
    lock = FileLock(path, timeout=wait_s, thread_local=False, is_singleton=False)
    _acquire(lock, home, wait_s)
    try:
        tmp = home / f"{HOLDER_NAME}.{unique_suffix()}.tmp"
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                                   "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "command": " ".join(sys.argv)[:300]}))
        os.replace(tmp, home / HOLDER_NAME)
        with _HELD_GUARD:
            _HELD[key] = me
        yield path
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        lock.release()
