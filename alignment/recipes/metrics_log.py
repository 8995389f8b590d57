"""The metrics sink of a recipe run: ``metrics.jsonl`` plus in-process callbacks.

One record per line: ``{"step", "total_steps", "phase": "train"|"eval", "time", <metric>: float, ...}``
(ARCHITECTURE.md, "Recipe run folder"), flushed per line so a parent process can tail the file.
Recipes know nothing of trackers: a tracker is a callback (or a process tailing the file).

Resume semantics: :meth:`MetricsLog.open` keeps the records of steps up to the resumed one and
drops later ones (those steps run again) and any torn last line a crash left mid-write.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["MetricsCallback", "MetricsLog"]

MetricsCallback = Callable[[dict[str, Any]], None]
"""Receives each metrics record: ``{"step", "total_steps", "phase", "time", <metric>: float, ...}``."""


class MetricsLog:
    """Writes records to ``metrics.jsonl`` (once :meth:`open`) and passes them to each callback.

    Only the main process of a multi-process run should :meth:`emit` (the caller decides).
    """

    def __init__(self, callbacks: Sequence[MetricsCallback] = ()) -> None:
        self.callbacks = list(callbacks)
        self._file: IO[str] | None = None

    def open(self, output_dir: Path, resumed_step: int) -> None:
        """Create ``output_dir`` and open ``metrics.jsonl`` for appending, keeping only the records
        of steps up to ``resumed_step`` (none on a fresh start)."""
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        keep = []
        if resumed_step and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if _record_step(ln) <= resumed_step]
        path.write_text("".join(ln + "\n" for ln in keep))
        self._file = path.open("a")

    def emit(self, step: int, total_steps: int | None, phase: str, metrics: dict[str, float]) -> dict[str, Any]:
        """Write one record (if open) and call the callbacks with it; returns the record."""
        record = {"step": step, "total_steps": total_steps, "phase": phase, "time": time.time(), **metrics}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        for callback in self.callbacks:
            callback(record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a torn or foreign line (a crash mid-write)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")
