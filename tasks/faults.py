"""Fault injection for crash tests: ``ALIGNFLOW_FAULT=<point>`` makes the process SIGKILL itself
when it reaches that point (a crash: no ``finally``, no atexit, no flushing).

Points are named where they are called (``ingest``, ``after:ingest``, ``train:reward``, ...);
``tests/fault`` lists them. Unset (always, outside those tests) this is one dictionary look-up.
This module imports nothing of the project, so any layer below ``flows/`` may call it.
"""

from __future__ import annotations

import os
import signal

ENV = "ALIGNFLOW_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL this process when ``ALIGNFLOW_FAULT`` equals ``name``."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def armed(name: str) -> bool:
    """Whether ``ALIGNFLOW_FAULT`` names ``name`` (for points that wait for a moment to kill)."""
    return os.environ.get(ENV) == name
