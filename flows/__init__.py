"""Prefect flows, the ``alignflow`` CLI, schedules and deployments.

The distribution installs three top-level packages, ``alignment``, ``tasks`` and ``flows``
(ARCHITECTURE.md, "Packaging", says why they are not renamed). ``tasks`` and ``flows`` are
generic names: should another distribution in the same environment install a package of the
same name, Python would import whichever comes first on the path and fail later with a
confusing error. This check fails at once instead, naming both locations.
"""

from __future__ import annotations

from pathlib import Path

import alignment
import tasks

_ROOT = Path(__file__).resolve().parent.parent
for _package in (tasks, alignment):
    _where = Path(getattr(_package, "__file__", None) or "<namespace package>").resolve().parent.parent
    if _where != _ROOT:
        raise ImportError(f"the imported {_package.__name__!r} package is not alignflow's: found in {_where}, "
                          f"expected beside {_ROOT / 'flows'}; another installed distribution uses the same "
                          "top-level name (uninstall it, or install alignflow in its own environment)")
