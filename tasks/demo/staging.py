"""A simulated batch lands whole or not at all: staged, reported, then moved into the landing folder.

The simulator writes a batch's files into ``<report_dir>/staging/<batch_id>/``, then its report
(``report-<batch_id>.json``, which lists the files' landing paths), then moves the files into the
landing folder one rename at a time. A process killed on the way leaves one of three states,
each of which :func:`finish_landing` (run before a round looks at the landing folder) settles:

- no report yet: nothing landed; the staged files are removed and the round simulates the batch again;
- report written, some or none of the files moved: the rest are moved, so the round ingests the
  whole batch (never a part of it) and its summary has the report's figures;
- everything moved: the empty staging folder is removed.

Imports nothing heavy (the demo's flow calls it before any stage runs).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tasks.faults import fault_point

__all__ = ["finish_landing", "land", "staging_dir"]


def staging_dir(report_dir: str | Path, batch_id: str) -> Path:
    """Where the batch ``batch_id`` is written before it lands."""
    return Path(report_dir) / "staging" / batch_id


def land(stage: Path, landing: Path) -> list[str]:
    """Move every file of ``stage`` into ``landing`` (names kept; a file already there is
    replaced), then remove ``stage``. Returns the landing paths moved. Across file systems a
    file is copied under a hidden temporary name in ``landing`` first, so the landing folder's
    patterns never match a half-copied file."""
    landing.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in sorted(p for p in stage.iterdir() if p.is_file() and not p.name.startswith(".")):
        target = landing / path.name
        try:
            os.replace(path, target)
        except OSError:  # another file system: copy beside the target, then rename
            tmp = landing / f".{path.name}.{os.getpid()}.landing"
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
            path.unlink()
        moved.append(str(target))
        fault_point("land:simulated-file")
    shutil.rmtree(stage, ignore_errors=True)
    return moved


def finish_landing(report_dir: str | Path, landing: str | Path) -> list[str]:
    """Settle batches a killed process left staged under ``report_dir`` (see the module's
    docstring); returns the ids of the batches whose landing it completed."""
    root = Path(report_dir) / "staging"
    if not root.is_dir():
        return []
    finished = []
    for stage in sorted(p for p in root.iterdir() if p.is_dir()):
        if (Path(report_dir) / f"report-{stage.name}.json").is_file():
            land(stage, Path(landing))
            finished.append(stage.name)
        else:
            shutil.rmtree(stage, ignore_errors=True)
    return finished
