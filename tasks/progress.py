"""Training progress where operators look: rate-limited lines in the Prefect run's logs and a
Prefect progress artifact, fed by a recipe's ``metrics.jsonl`` records.

The training runs in its own process; :class:`tasks.tracking.MetricStreamer` tails its
``metrics.jsonl`` on a thread and hands each record to :meth:`TrainingProgress.observe`. The
Prefect calls (logger, artifact) are made only from :meth:`TrainingProgress.tick`, which the
launcher calls from the task's own thread: Prefect finds the task run through context
variables, which a streaming thread does not inherit.

Assumes records carry ``step`` and, for train lines, ``total_steps`` (ARCHITECTURE.md, "Recipe
run folder"). ETA is measured from the steps seen in this process's lifetime, so a resumed run
(whose first record is at step k) is not credited with steps it did not take now.
Outside a Prefect run (library use, tests) lines go to this module's logger and no artifact is made.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import Any

KEY_METRICS = ("loss", "rewards/accuracy", "rewards/margin", "accuracy", "reward/raw", "kl", "eval/loss",
               "eval/accuracy", "eval/rewards/accuracy")
"""Metrics shown in a progress line, when the record has them (others stay in MLflow)."""


def _run_context() -> bool:
    """True inside a Prefect flow or task run (where logs and artifacts belong to a run)."""
    try:
        from prefect.context import FlowRunContext, TaskRunContext

        return TaskRunContext.get() is not None or FlowRunContext.get() is not None
    except Exception:  # noqa: BLE001 - Prefect missing or misconfigured: plain logging
        return False


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task (the UI shows it), else this module's."""
    if _run_context():
        from prefect.logging import get_run_logger

        return get_run_logger()
    return logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a log line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def figure(value: Any) -> str:
    """A metric for people: 4 significant digits, no float noise."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def artifact_key(stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", stage.lower())).strip("-") + "-progress"


class TrainingProgress:
    """Progress of one training stage, reported at most every ``every_s`` seconds.

    :meth:`observe` (any thread) keeps the newest train record and queues eval records;
    :meth:`tick` (the run's thread) logs ``train dpo: step 40/200 (20%), loss 0.5123, ... ETA
    3m05s`` when a new step arrived and ``every_s`` passed since the last line, logs every eval
    record at once, and moves the progress artifact (created on the first tick inside a Prefect
    run). :meth:`finish` logs the last step and sets the artifact to where training ended.
    ``every_s`` None: no progress lines and no artifact (evaluations are still logged).
    """

    def __init__(self, stage: str, every_s: float | None = 60.0, clock=time.monotonic, logger=None) -> None:
        self.stage, self.every_s, self.clock = stage, every_s, clock
        self.logger = logger
        self._lock = threading.Lock()
        self._latest: dict[str, Any] | None = None
        self._evals: list[dict[str, Any]] = []
        self._first: tuple[float, int] | None = None  # (clock, step) of the first record seen
        self._logged_step: int | None = None
        self._last_line = -math.inf
        self._artifact_id = None
        self._artifact_tried = False
        self.lines: list[str] = []

    def observe(self, record: dict[str, Any]) -> None:
        """Take one ``metrics.jsonl`` record (called from the streaming thread)."""
        with self._lock:
            if record.get("phase", "train") == "eval":
                self._evals.append(dict(record))
                return
            if "step" not in record:
                return
            if self._first is None:
                self._first = (self.clock(), int(record["step"]))
            self._latest = dict(record)

    def eta_s(self, record: dict[str, Any]) -> float | None:
        """Seconds left at the step rate seen so far; None before two steps or without a total."""
        total, step = record.get("total_steps"), int(record.get("step", 0))
        if not total or self._first is None:
            return None
        t0, s0 = self._first
        done, elapsed = step - s0, self.clock() - t0
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (int(total) - step) * elapsed / done)

    def line(self, record: dict[str, Any]) -> str:
        """One progress line for a train record."""
        step, total = int(record.get("step", 0)), record.get("total_steps")
        where = f"step {step}/{int(total)} ({100 * step / int(total):.0f}%)" if total else f"step {step}"
        shown = [f"{k} {figure(record[k])}" for k in KEY_METRICS if k in record]
        eta = self.eta_s(record)
        tail = f", ETA {duration(eta)}" if eta is not None and step < int(total or 0) else ""
        return f"{self.stage}: {where}" + "".join(f", {s}" for s in shown) + tail

    def _log(self, message: str) -> None:
        self.lines.append(message)
        (self.logger or run_logger()).info(message)

    def _artifact(self, percent: float, description: str) -> None:
        if not _run_context():
            return
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self._artifact_id is None and not self._artifact_tried:
                self._artifact_tried = True
                self._artifact_id = create_progress_artifact(percent, key=artifact_key(self.stage),
                                                             description=description)
            elif self._artifact_id is not None:
                update_progress_artifact(self._artifact_id, percent, description=description)
        except Exception as err:  # noqa: BLE001 - an API hiccup must not stop training
            logging.getLogger(__name__).warning("progress artifact of %s not updated: %s", self.stage, err)

    def tick(self, force: bool = False) -> str | None:
        """Report when due (see the class docstring); returns the train line logged, if any."""
        with self._lock:
            latest, evals, self._evals = self._latest, self._evals, []
        for rec in evals:
            shown = ", ".join(f"{k} {figure(v)}" for k, v in rec.items()
                              if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool))
            self._log(f"{self.stage}: evaluation at step {rec.get('step')}: {shown or 'no metrics'}")
        if latest is None or int(latest["step"]) == self._logged_step or self.every_s is None:
            return None
        now = self.clock()
        if not force and now - self._last_line < self.every_s:
            return None
        self._last_line, self._logged_step = now, int(latest["step"])
        message = self.line(latest)
        self._log(message)
        total = latest.get("total_steps")
        if total:
            self._artifact(min(100.0, 100.0 * int(latest["step"]) / int(total)), message)
        return message

    def finish(self) -> str | None:
        """Report the last step seen (after the training process ended)."""
        return self.tick(force=True)
