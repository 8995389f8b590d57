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

A flow run killed before its round record names it (while it waits for the home's lock, or
before the record is written) is found by its *flow mark*: ``<home>/.alignflow-flows/<unique>.json``
(:class:`FlowMark`: pid, host, the process's start time, the Prefect flow run), written atomically
before the lock is taken and removed when the flow returns. The next lock holder (a run, or
``monitor``) closes, through :func:`close_dead_flow_runs` (the one path that also closes a dead
round's flow runs), the flow run of each mark whose process is gone from this host or whose pid now
belongs to a process started at another time; another host's process cannot be checked from here, so
its mark is left until its flow run has ended by other means (the Kubernetes worker crashes the flow
runs of dead pods), then removed.

Ledger order at the end of a round: the ended state is written first, then the round's
pending files are settled as consumed (:meth:`tasks.data.landing.Ledger.settle`), then
``settled`` is set. A crash between the two is finished by the next run's :meth:`RoundLog.begin`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    replayed_batches: list[str] | None = None
    """Earlier batches its build reads (``preferences.replay_refused``), fixed at ``ingested``; a
    retry of this round reads these again, whatever the registry says by then."""
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
            # the redo builds from the same batches: the dead round may have moved the champion alias already
            record.replayed_batches = previous.replayed_batches
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

    def ended_rounds(self) -> list[RoundRecord]:
        """Every ended (or failed) round of ``rounds.jsonl``, oldest first; an unreadable line is skipped."""
        try:
            lines = self.history_path.read_text().splitlines()
        except OSError:
            return []
        rounds = []
        for line in lines:
            try:
                rounds.append(RoundRecord.model_validate_json(line))
            except ValueError:
                continue
        return rounds

    def refused_since_promotion(self, champion_version: str | None) -> list[str]:
        """Batch ids of the rounds the gate refused since the champion was promoted, oldest first.

        Those batches were sampled from the champion, as the newest one is. The rounds are those
        after the newest round that promoted; if that round's version is not ``champion_version``
        (the alias was moved by hand, or rolled back), their feedback came from another model and
        the answer is []. With no promoting round in the log, the refused rounds are the base
        model's, which counts as the champion only while there is none (``champion_version`` None).
        """
        refused: list[str] = []
        for record in reversed(self.ended_rounds()):
            if record.state == "promoted":
                return refused[::-1] if record.policy_version == champion_version else []
            if record.state == "rejected" and record.batch_id:
                refused.append(record.batch_id)
        return refused[::-1] if champion_version is None else []

    def settled(self, record: RoundRecord) -> None:
        """Mark the round's landing files as settled in the ledger (persisted)."""
        record.settled = True
        self.save(record)


# ----------------------------------------------------------------------------- flow marks

FLOW_MARKS = ".alignflow-flows"
"""Folder of the home holding one :class:`FlowMark` per flow run that has started on the home
and not yet returned (``<home>/.alignflow-flows/<unique>.json``)."""


class FlowMark(BaseModel):
    """A flow run that started on a home: written before it waits for the home's lock, removed
    when it returns (normally or by an exception). One left behind by a dead process is how the
    next lock holder finds a flow run killed before its round record named it."""

    flow_run_id: str
    """The Prefect flow run (closed as CRASHED once this process is found dead)."""
    flow: str
    """The flow's name (``alignment-pipeline``, ``monitor-feedback``)."""
    pid: int = Field(default_factory=os.getpid)
    host: str = Field(default_factory=socket.gethostname)
    process_start: int | None = None
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat``; None where there is
    no /proc): a live process with this pid and another start time is a reused pid, not this run."""
    at: str = Field(default_factory=_now)


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in () may hold spaces


def process_alive(pid: int, host: str, started: int | None) -> bool:
    """Whether the process a mark names may still run. Another host's process cannot be checked
    from here and counts as alive; on this host a missing pid, or a pid now held by a process that
    started at another time (reused), is dead."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = process_start(pid)
    return started is None or now is None or now == started


class FlowMarks:
    """The flow marks of one home (see :class:`FlowMark`)."""

    def __init__(self, home: str | Path) -> None:
        self.folder = Path(home) / FLOW_MARKS

    @contextmanager
    def mark(self, flow_run_id: str | None, flow: str) -> Iterator[Path | None]:
        """Hold a mark for the body (written atomically before it, removed after it). Without a
        flow run id (not inside a Prefect flow run) there is nothing to close later: no mark."""
        if not flow_run_id:
            yield None
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{unique_suffix()}.json"
        tmp = self.folder / f".{path.name}.tmp"
        record = FlowMark(flow_run_id=flow_run_id, flow=flow, process_start=process_start(os.getpid()))
        with tmp.open("w") as f:
            f.write(record.model_dump_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def read(self) -> dict[Path, FlowMark]:
        """Every mark, by file. An unreadable one (torn before its rename cannot happen; a foreign
        file) is skipped."""
        found = {}
        for path in sorted(self.folder.glob("*.json")):
            try:
                found[path] = FlowMark.model_validate_json(path.read_text())
            except (OSError, ValueError):
                continue
        return found


def close_dead_flow_runs(home: str | Path, flow_run_ids: set[str] | frozenset[str] = frozenset(),
                         keep: str | None = None,
                         message: str = "its process died; closed by the next run on this home") -> list[str]:
    """Close, as CRASHED, the Prefect flow runs of processes that died on ``home``: those of the
    dead flow marks plus ``flow_run_ids`` (a dead round's, from its record and its MLflow runs),
    except ``keep`` (the caller's own). Then remove those marks, and those of other hosts whose
    flow run has ended (e.g. set CRASHED by the Kubernetes worker when its pod died): their
    processes cannot be checked from here. Returns the flow runs changed. Call it holding the
    home's lock: a dead round's writer is then surely gone."""
    marks = FlowMarks(home).read()  # once: the dead (see process_alive) and other hosts' (pods sharing the volume)
    dead = {p: m for p, m in marks.items() if not process_alive(m.pid, m.host, m.process_start)}
    ids = (set(flow_run_ids) | {m.flow_run_id for m in dead.values()}) - {keep or ""}
    crashed = close_stale_flow_runs(sorted(ids - {""}), message)
    foreign = {p: m for p, m in marks.items() if m.host != socket.gethostname()}
    ended = set(ended_flow_runs(sorted({m.flow_run_id for m in foreign.values()}))) if foreign else set()
    for path in [*dead, *(p for p, m in foreign.items() if m.flow_run_id in ended)]:
        path.unlink(missing_ok=True)
    return crashed


def _known_flow_runs(client, flow_run_ids: list[str]):
    """``(id, flow run)`` of each id the API can read; one it does not know (another Prefect
    server, a wiped database) or cannot read is skipped."""
    from uuid import UUID

    for run_id in flow_run_ids:
        try:
            yield run_id, client.read_flow_run(UUID(run_id))
        except Exception:  # noqa: BLE001 - unknown id, or another server's run
            continue


def ended_flow_runs(flow_run_ids: list[str]) -> list[str]:
    """Those of the Prefect flow runs that are in a final state. One the API does not know (another
    server) or cannot read is left out (it may still run)."""
    if not flow_run_ids:
        return []
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return [run_id for run_id, run in _known_flow_runs(client, flow_run_ids)
                if run.state is not None and run.state.is_final()]


def close_stale_flow_runs(flow_run_ids: list[str], message: str) -> list[str]:
    """Set each Prefect flow run that is not in a final state to CRASHED. Returns those changed.

    Best effort: a flow run the API does not know (another Prefect server, a wiped database),
    or one the API refuses to change, is skipped."""
    if not flow_run_ids:
        return []
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    changed = []
    with get_client(sync_client=True) as client:
        for run_id, run in _known_flow_runs(client, flow_run_ids):
            if run.state is None or not run.state.is_final():
                try:
                    client.set_flow_run_state(run.id, Crashed(message=message), force=True)
                except Exception:  # noqa: BLE001 - a server hiccup must not fail the round that recovers
                    continue
                changed.append(run_id)
    return changed
