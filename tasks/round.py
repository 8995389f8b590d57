"""A round as a transaction: its states, persisted where the next run reads them.

States, in order (DESIGN.md "A round is a transaction")::

    started → ingested → built → trained → evaluated → registered → gated → promoted | rejected

and the other ends: ``unchanged`` (the champion already reflects this data and config),
``no-new-data`` (``--only-if-new-data`` found nothing), ``failed-on-data`` (the batch was
refused, recorded as failed in the ledger). ``failed`` is a round that raised for another
reason (a wrong model path, a timeout): its files stay pending, so the next run retries it.

The record lives in ``<home>/data/<pipeline>/round.json`` (one file, replaced atomically on
every step; JSON, no pickles) and each ended round is appended to ``rounds.jsonl`` beside it.
A record left in a state that is neither an end nor ``failed`` means its process died: the
next run (under the home lock, so the writer is surely dead) closes that round's MLflow and
Prefect runs and then redoes the round; every step is idempotent (cached stages, resumable
training, registration found by candidate digest), so it ends where an uninterrupted run would.

Ledger order at the end of a round: the ended state is written first, then the round's
pending files are settled as consumed (:meth:`tasks.data.landing.Ledger.settle`), then
``settled`` is set. A crash between the two is finished by the next run's :meth:`RoundLog.begin`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.lock import unique_suffix

STEPS = ("started", "ingested", "built", "trained", "evaluated", "registered", "gated")
ENDS = ("promoted", "rejected", "unchanged", "no-new-data", "failed-on-data")
FAILED = "failed"
SETTLES = ("promoted", "rejected", "unchanged")
"""Ends that consume the round's pending landing files (failed-on-data records its own)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RoundRecord(BaseModel):
    """One round: where it got to and what the next run needs to finish it."""

    round_id: str
    """Unique per round (time, pid, random)."""
    pipeline: str
    state: str = "started"
    """The last step that completed (see the module docstring)."""
    history: list[dict[str, str]] = Field(default_factory=list)
    """Every state with the time it was reached: ``{"state", "at"}``."""
    pid: int = Field(default_factory=os.getpid)
    host: str = Field(default_factory=socket.gethostname)
    flow_run_id: str | None = None
    """The Prefect flow run (closed as CRASHED by the next run when this process died)."""
    mlflow_run_id: str | None = None
    """The MLflow parent run (closed as FAILED by the next run when this process died)."""
    batch_id: str | None = None
    """The ingest batch this round consumes; None: nothing new was ingested."""
    dataset_digest: str | None = None
    candidate_digest: str | None = None
    policy_version: str | None = None
    """The registered candidate's version (from ``registered`` on)."""
    promoted: bool | None = None
    """The gate's decision once ``gated``."""
    settled: bool = False
    """The round's landing files were marked consumed (or it had none to mark)."""
    retry_of: str | None = None
    """The earlier round this one redoes (it died or failed before it ended), and where it stopped."""
    error: str | None = None
    """What a ``failed`` or ``failed-on-data`` round raised (first 2000 characters)."""

    @property
    def ended(self) -> bool:
        return self.state in ENDS

    @property
    def interrupted(self) -> bool:
        """The process died inside this round (neither ended nor failed with an error)."""
        return not self.ended and self.state != FAILED


class RoundLog:
    """The round record of one pipeline (``round.json``) and the list of ended rounds (``rounds.jsonl``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / "round.json"
        self.history_path = self.folder / "rounds.jsonl"

    def load(self) -> RoundRecord | None:
        """The last round's record, or None (first round, or an unreadable record: it is replaced)."""
        try:
            return RoundRecord.model_validate_json(self.path.read_text())
        except (OSError, ValueError):
            return None

    def save(self, record: RoundRecord) -> None:
        """Replace the record atomically (unique temp name, fsync, rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".round.json.{unique_suffix()}.tmp"
        with tmp.open("w") as f:
            f.write(record.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def begin(self, pipeline: str, **fields: Any) -> tuple[RoundRecord, RoundRecord | None]:
        """Start a round. Returns (new record, the previous round's record or None).

        The caller looks at ``previous.interrupted`` to close the dead round's runs and settles
        an ended round whose ``settled`` is false (see :meth:`settled`)."""
        previous = self.load()
        record = RoundRecord(round_id=f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{unique_suffix()}",
                             pipeline=pipeline, **fields)
        record.history.append({"state": record.state, "at": _now()})
        if previous is not None and not previous.ended:
            record.retry_of = f"{previous.round_id} ({'died' if previous.interrupted else 'failed'} at {previous.state})"
        self.save(record)
        return record, previous

    def advance(self, record: RoundRecord, state: str, **fields: Any) -> RoundRecord:
        """Record that ``state`` was reached (with any fields learnt on the way) and persist it."""
        if state not in STEPS and state not in ENDS and state != FAILED:
            raise ValueError(f"unknown round state {state!r}")
        for key, value in fields.items():
            setattr(record, key, value)
        record.state = state
        record.history.append({"state": state, "at": _now()})
        self.save(record)
        if state in ENDS or state == FAILED:
            with self.history_path.open("a") as f:
                f.write(json.dumps({k: v for k, v in record.model_dump(mode="json").items() if k != "history"},
                                   sort_keys=True) + "\n")
        return record

    def settled(self, record: RoundRecord) -> None:
        """Mark the round's landing files as settled in the ledger (persisted)."""
        record.settled = True
        self.save(record)


def close_stale_flow_runs(flow_run_ids: list[str], message: str) -> list[str]:
    """Set each Prefect flow run that is not in a final state to CRASHED. Returns those changed.

    Best effort: a flow run the API does not know (another Prefect server, a wiped database),
    or one the API refuses to change, is skipped."""
    if not flow_run_ids:
        return []
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    changed = []
    with get_client(sync_client=True) as client:
        for run_id in flow_run_ids:
            try:
                run = client.read_flow_run(UUID(run_id))
            except Exception:  # noqa: BLE001 - unknown id, or another server's run
                continue
            if run.state is None or not run.state.is_final():
                try:
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                except Exception:  # noqa: BLE001 - a server hiccup must not fail the round that recovers
                    continue
                changed.append(run_id)
    return changed
