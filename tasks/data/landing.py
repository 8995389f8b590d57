"""Ingest: new landing files and explicit sources -> validated tables, quarantine, report, ledger.

Each file (or saved-dataset folder) is tracked by its sha256 content digest in the pipeline's
JSON-lines ledger (:class:`Ledger`, default ``<out_dir>/ledger.jsonl``), so a scheduled run takes
only new content, a run with nothing new ingests nothing, and a file whose content changed
counts as new (its earlier rows are not retracted; the builder counts rows repeated across
batches once). Explicit sources are tracked the same way (hub datasets by id, config, split and
revision). A digest is ``pending`` while the round that ingested it runs, then ``consumed`` when
that round ends, or ``failed`` when its batch failed on its data (see :func:`ingest`).

Files still being written are not read. Convention: write under a name starting with ``.`` or
ending in ``.tmp``/``.part`` (see ``PARTIAL_SUFFIXES``), then rename it into place (atomic).
A file written in place is taken once it looks complete (text ending with a newline, JSON with
its closing bracket, Parquet with its footer) or once ``data.landing_quiet_s`` seconds passed
since its last change.

Layout under ``out_dir`` (one batch = the files of one ingest, id = digest of their digests)::

    validated/<kind>/<batch>.arrow       what passed, per kind, as Arrow IPC (the builder reads them all)
    quarantine/<batch>.parquet           what failed, with every reason and the raw row
    reports/<batch>.json                 counts, reasons, per-file counts
    ledger.jsonl                         digest, state, path, batch, file stat (one entry per line)

A batch over ``quarantine_max_share`` writes its quarantine and report, then raises
:class:`~tasks.data.validate.QuarantineThresholdExceeded`; its validated tables are not written
and its files are recorded as failed under the current validation settings, so fixing the
export (new content) or changing the ``data`` settings (e.g. raising the limit) and re-running
ingests them. Re-running a batch rewrites the same files (idempotent)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.handoff import (
    batch_files,
    drop_older_formats,
    validated_files,
    validated_path,
    validated_root,
)
from tasks.data.heap import retained_heap
from tasks.data.raw import RawTable, UnreadableSource
from tasks.data.readers import (
    content_digest,
    detect_format,
    list_source_files,
    outside,
    read_source,
)
from tasks.data.scan import TextScan, scan_text
from tasks.data.settings import IngestSettings, SourceSettings
from tasks.data.validate import (
    FileReport,
    QuarantineThresholdExceeded,
    ValidationReport,
    ValidationResult,
    validate_tables,
)
from tasks.faults import fault_point

PENDING, CONSUMED, FAILED = "pending", "consumed", "failed"
"""Ledger states of a content digest: ingested into a round that has not ended yet (taken again
by the next ingest), used by a round that ended, or refused for its data (quarantine over the
limit; taken again only when the ``data`` settings change or the content does)."""

PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".inprogress", ".filepart")
"""Landing names that are never read: the write-then-rename convention (also names starting with ``.``)."""


class LedgerCorrupt(ValueError):
    """A ledger line other than the last is not JSON (a torn last line is tolerated)."""


class Ledger:
    """Content digests seen by one pipeline and their state, as append-only JSON lines.

    Each line is one entry (``digest``, ``state``, ``path``, ``batch_id``, file stat, ...); the
    last line of a digest holds its state (lines without ``state``, from older versions, mean
    consumed). A crash mid-append can leave the last line torn: it is ignored when read and cut
    off before the next append. Callers hold the home lock (:mod:`tasks.lock`): one writer.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict]:
        """Every complete entry in file order. Raises LedgerCorrupt naming the file and line."""
        if not self.path.exists():
            return []
        lines = self.path.read_bytes().split(b"\n")
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or "digest" not in entry:
                    raise ValueError("not an entry with a digest")
            except ValueError as err:
                if number == len(lines):  # no newline after it: an append a crash cut short
                    continue
                raise LedgerCorrupt(f"ledger {self.path}, line {number}: {err}; fix or remove that line "
                                    f"(each line is one JSON entry)") from err
            out.append(entry)
        return out

    def latest(self) -> dict[str, dict]:
        """Digest -> its newest entry (with ``state`` filled in for older lines)."""
        out: dict[str, dict] = {}
        for entry in self.entries():
            out[entry["digest"]] = {"state": CONSUMED, **entry}
        return out

    def digests(self, states: tuple[str, ...] = (CONSUMED,)) -> set[str]:
        """Digests whose current state is one of ``states``."""
        return {d for d, e in self.latest().items() if e["state"] in states}

    def record(self, entries: list[dict]) -> None:
        """Append entries (each with at least ``digest``, ``path`` and ``state``), flushed to disk."""
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                with self.path.open("rb") as r:
                    data = r.read()
                if not data.endswith(b"\n"):  # a torn last line: cut it off
                    f.truncate(data.rfind(b"\n") + 1)
            f.write("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode())
            f.flush()
            os.fsync(f.fileno())

    def settle(self, state: str, *, batch_id: str | None = None, reason: str | None = None) -> int:
        """Move every pending digest (of ``batch_id``, when given) to ``state``. Returns how many.

        Idempotent: a re-run after a crash settles what is still pending and nothing else."""
        now = _now()
        moved = [{**e, "state": state, "settled_at": now, **({"reason": reason} if reason else {})}
                 for e in self.latest().values()
                 if e["state"] == PENDING and (batch_id is None or e.get("batch_id") == batch_id)]
        self.record(moved)
        return len(moved)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


LEGACY_LEDGER = ".alignflow-ledger.jsonl"


def ledger_for(settings: IngestSettings, out_dir: str | Path) -> Ledger:
    """The configured ledger; default ``ledger.jsonl`` in ``out_dir`` (the pipeline's own data folder).

    Why not in the landing folder: several pipelines may read one folder, each consuming it for
    itself. A ledger an older version kept in the landing folder is adopted once: its entries of
    batches this ``out_dir`` holds a report of (so this pipeline ingested them) are copied.
    """
    if settings.ledger_path:
        return Ledger(settings.ledger_path)
    ledger = Ledger(Path(out_dir) / "ledger.jsonl")
    legacy = Path(settings.landing_dir) / LEGACY_LEDGER if settings.landing_dir else None
    if not ledger.path.exists() and legacy is not None and legacy.is_file():
        reports = Path(out_dir) / "reports"
        ledger.record([{**e, "state": CONSUMED} for e in Ledger(legacy).entries()
                       if e.get("batch_id") and (reports / f"{e['batch_id']}.json").exists()])
    return ledger


def settings_digest(settings: IngestSettings) -> str:
    """Digest of the validation settings (not where files are): a failed digest is retried when it changes."""
    blob = json.dumps(settings.model_dump(mode="json", exclude={"landing_dir", "ledger_path", "sources"}),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PendingSource:
    """A source to ingest, with its identity digest."""

    options: SourceSettings
    digest: str
    scan: TextScan | None = None
    """The text scan of a JSONL or CSV file, made while hashing it (the reader reuses it)."""


def _text_format(src: SourceSettings) -> str | None:
    try:
        return src.format if src.format != "auto" else detect_format(src.path)
    except ValueError:  # reported when the source is read
        return None


def _source_digest(src: SourceSettings) -> tuple[str, TextScan | None]:
    """Content digest of a local source (text files: with their scan, one pass for both), or
    the identity digest of a hub dataset."""
    path = Path(src.path)
    if path.is_file() and _text_format(src) in ("jsonl", "csv"):
        scan = scan_text(path)
        return scan.digest, scan
    if path.exists():
        return content_digest(path), None
    ident = json.dumps([src.path, src.config_name, src.split, src.revision])
    return "hub:" + hashlib.sha256(ident.encode()).hexdigest(), None


def _stat_key(path: Path) -> tuple[str, int, int, int, int] | None:
    """(path, size, mtime, ctime, inode): any write or replacement changes ctime, which no user
    call can set back, so an equal key means unchanged content (used to skip re-hashing)."""
    if not path.is_file():
        return None
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _stat_fields(stat: tuple | None) -> dict:
    keys = ("size", "mtime_ns", "ctime_ns", "ino")
    return dict(zip(keys, stat[1:], strict=True)) if stat else dict.fromkeys(keys)


def _entry_stat_key(entry: dict) -> tuple | None:
    if entry.get("ctime_ns") is None:  # entries of older versions: hash the file again
        return None
    return entry["path"], entry.get("size"), entry.get("mtime_ns"), entry["ctime_ns"], entry.get("ino")


def is_partial_name(path: Path) -> bool:
    """Names a writer is still filling under the write-then-rename convention."""
    return path.name.startswith(".") or path.name.lower().endswith(PARTIAL_SUFFIXES)


def looks_complete(path: Path) -> bool:
    """Whether a file ends the way a finished file of its format ends: text lines with a newline,
    a JSON document with ``]`` or ``}``, Parquet with its footer magic. Unknown formats: True."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv", ".json", ".parquet"):
        return True
    size = path.stat().st_size
    if size == 0:
        return False
    with path.open("rb") as f:
        f.seek(max(0, size - 64))
        tail = f.read()
    if suffix == ".parquet":
        return tail.endswith(b"PAR1")
    if suffix == ".json":
        return tail.rstrip()[-1:] in (b"]", b"}")
    return tail.endswith(b"\n")


def still_being_written(path: Path, quiet_s: float, now: float | None = None) -> bool:
    """A landing file left for a later run: a partial name, or modified less than ``quiet_s``
    seconds ago without looking complete (see the module docstring's convention)."""
    if is_partial_name(path):
        return True
    if not path.is_file():
        return False
    age = (time.time() if now is None else now) - path.stat().st_mtime
    return age < quiet_s and not looks_complete(path)


def pending_sources(settings: IngestSettings, ledger: Ledger) -> tuple[list[PendingSource], list[str]]:
    """Sources to ingest in order (explicit ones first, then landing files by path) and skipped paths.

    Skipped: content consumed by an ended round, content that failed on its data under the same
    validation settings, and landing files still being written (:func:`still_being_written`).
    Pending content (ingested by a round that has not ended: it crashed or failed) is taken
    again. A file whose path, size, mtime, ctime and inode match a ledger entry is not re-read
    (scheduled runs over a large landing folder stay cheap); any other file is hashed.
    """
    latest = ledger.latest()
    current = settings_digest(settings)

    def done(digest: str) -> bool:
        entry = latest.get(digest)
        if entry is None or entry["state"] == PENDING:
            return False
        return entry["state"] == CONSUMED or entry.get("settings") == current

    by_stat = {key: e["digest"] for e in latest.values() if (key := _entry_stat_key(e)) is not None}
    candidates: list[SourceSettings] = []
    for src in settings.sources:
        p = Path(src.path)
        if p.is_dir() and src.format in ("auto", "jsonl", "csv", "parquet") and not (p / "dataset_info.json").exists() \
                and not (p / "dataset_dict.json").exists():
            candidates += [src.model_copy(update={"path": str(f)}) for f in list_source_files(p, settings.landing_patterns)]
        else:
            candidates.append(src)
    if settings.landing_dir and Path(settings.landing_dir).exists():
        now = time.time()
        for f in list_source_files(settings.landing_dir, settings.landing_patterns):
            if still_being_written(Path(f), settings.landing_quiet_s, now):
                continue
            candidates.append(SourceSettings(path=str(f), kind=settings.landing_kind, layout=settings.landing_layout))
    pending, skipped, taken = [], [], set()
    for src in candidates:
        known = by_stat.get(_stat_key(Path(src.path)))
        if known is not None and done(known):
            skipped.append(src.path)
            continue
        digest, scan = _source_digest(src)
        if done(digest) or digest in taken:
            skipped.append(src.path)
            continue
        taken.add(digest)
        pending.append(PendingSource(src, digest, scan))
    return pending, skipped


@dataclass
class IngestResult:
    """What an ingest hands on: the batch, its files and counts (paths as strings)."""

    batch_id: str | None
    """Digest of the ingested sources' digests; None when nothing new was found."""
    sources: list[str]
    """Sources ingested in this batch."""
    skipped: list[str]
    """Sources skipped because their content was ingested before."""
    validated: dict[str, str] = field(default_factory=dict)
    """Validated Parquet file per kind written by this batch."""
    quarantine: str | None = None
    report_path: str | None = None
    report: dict = field(default_factory=dict)
    """:meth:`ValidationReport.to_dict` of the batch (empty when nothing new)."""

    @property
    def new_data(self) -> bool:
        return self.batch_id is not None

    def to_dict(self) -> dict:
        return asdict(self)


log = logging.getLogger(__name__)


def read_and_validate(sources: list[SourceSettings], settings: IngestSettings,
                      digests: list[str | None] | None = None,
                      scans: list[TextScan | None] | None = None) -> ValidationResult:
    """Read sources (with their digests and text scans, when known) and validate them as one
    batch (no files written).

    A local file that cannot be read at all (corrupt or truncated Parquet, too large once
    decompressed, a header repeating a name, ...) does not stop the batch: it becomes one
    quarantine row (``source_row`` 0, its reason, the error as ``raw``) that counts against
    ``quarantine_max_share``, with a note in its file report, and the other files go on. So does a
    path under ``landing_dir`` that resolves outside it (``symlink_outside_landing``; never
    opened). Raises FileNotFoundError for a missing source, and whatever a hub download raises.
    """
    tables = []
    for src, digest, scan in zip(sources, digests or [None] * len(sources), scans or [None] * len(sources),
                                 strict=True):
        known = digest if digest and not digest.startswith("hub:") else None
        try:
            if settings.landing_dir and Path(src.path).is_relative_to(settings.landing_dir) and \
                    outside(src.path, settings.landing_dir):
                raise UnreadableSource("symlink_outside_landing", "a link that resolves outside the landing folder")
            table = read_source(src.path, src.format, split=src.split, config_name=src.config_name,
                                revision=src.revision, digest=known, scan=scan)
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - one file must not stop the batch; the reason is kept
            if src.format == "hub" or detect_format_or_none(src) == "hub":
                raise
            table = unreadable_table(src.path, err, known)
        tables.append((table, src))
    result = validate_tables(tables, settings)
    _report_refused_links(result.report, sources, settings)
    return result


def _report_refused_links(report: ValidationReport, sources: list[SourceSettings], settings: IngestSettings) -> None:
    """Links in the landing folder that resolve outside it (never listed, never read) go into the
    batch report as files with no rows, so the refusal is on record and not only in a log."""
    if not settings.landing_dir or not Path(settings.landing_dir).is_dir():
        return
    refused: list[Path] = []
    list_source_files(settings.landing_dir, settings.landing_patterns, refused, warn=False)  # warned when listed
    listed = {str(s.path) for s in sources}
    report.files += [FileReport(str(link), unreadable="symlink_outside_landing",
                                notes=["refused: a symlink that resolves outside the landing folder (not read)"])
                     for link in refused if str(link) not in listed]


def detect_format_or_none(src: SourceSettings) -> str | None:
    try:
        return detect_format(src.path)
    except ValueError:
        return None


def unreadable_table(path: str, err: Exception, digest: str | None = None) -> RawTable:
    """A source that could not be read, as one read error (row 0) naming why."""
    reason = err.reason if isinstance(err, UnreadableSource) else "unreadable_file"
    message = str(err) if isinstance(err, UnreadableSource) else f"{type(err).__name__}: {err}"
    if not isinstance(err, UnreadableSource):
        log.warning("cannot read %s", path, exc_info=err)
    message = message[:2000]
    return RawTable(pd.DataFrame(), str(path), np.zeros(0, np.int64),
                    [(0, reason, json.dumps({"error": message}, ensure_ascii=False))], digest=digest,
                    notes=[f"not read ({reason}): {message}"], unreadable=reason)


SAMPLE_RAW_CHARS = 1000
"""Longest ``raw`` text in the quarantine sample logged to MLflow (the Parquet file keeps it whole)."""


def quarantine_sample(path: str | Path, rows: int = 500, max_chars: int = SAMPLE_RAW_CHARS) -> pd.DataFrame:
    """The first ``rows`` quarantine rows for a tracking UI: reasons joined with ``; ``, ``raw``
    cut to ``max_chars`` (marked). Only landing bytes can be in it: links out of the landing
    folder are refused unread, and an unreadable file's ``raw`` is its error message."""
    with pq.ParquetFile(path) as pf:
        head = next(pf.iter_batches(batch_size=rows), None)
    frame = (head.to_pandas() if head is not None else pf.schema_arrow.empty_table().to_pandas()).head(rows)
    frame["reasons"] = frame["reasons"].map(lambda r: "; ".join(r))
    frame["raw"] = frame["raw"].map(lambda t: t if t is None or len(t) <= max_chars
                                    else f"{t[:max_chars]}... [cut: {len(t)} characters]")
    return frame


def write_quarantine(result: ValidationResult, path: str | Path) -> str:
    """Write the quarantine Parquet (reasons as list<string>), atomically (unique temp name, rename):
    two writers (e.g. two ``alignflow ingest`` checks, which take no home lock) never tear it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    q = result.quarantine
    table = pa.table({
        "source_file": pa.array(q["source_file"].astype(object), pa.string()),
        "source_row": pa.array(q["source_row"].to_numpy(), pa.int64()),
        "kind": pa.array(q["kind"].astype(object), pa.string()),
        "reasons": pa.array(q["reasons"].tolist(), pa.list_(pa.string())),
        "raw": pa.array(q["raw"].astype(object), pa.string()),
    })
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


@retained_heap()
def ingest(settings: IngestSettings, out_dir: str | Path, *, commit: bool = True) -> IngestResult:
    """Ingest new sources into ``out_dir`` (see the module docstring).

    ``commit=True`` records the batch's files as consumed; ``commit=False`` (the pipeline)
    records them as pending, and the round settles them with :meth:`Ledger.settle` when it ends,
    so a round that crashes or fails is retried by the next ingest (same files, same batch id:
    the same outputs are rewritten). Raises QuarantineThresholdExceeded (after writing the
    quarantine and report, and recording the files as failed), AlreadyConsumed (see
    :func:`_explain_nothing_new`), FileNotFoundError or ValueError for unreadable sources.
    """
    out = Path(out_dir)
    ledger = ledger_for(settings, out)
    pending, skipped = pending_sources(settings, ledger)
    if not pending:
        _explain_nothing_new(ledger, skipped, out)
        return IngestResult(None, [], skipped)
    batch = hashlib.sha256("\n".join(sorted(p.digest for p in pending)).encode()).hexdigest()[:16]
    result = read_and_validate([p.options for p in pending], settings, [p.digest for p in pending],
                               [p.scan for p in pending])
    report: ValidationReport = result.report
    q_path = write_quarantine(result, out / "quarantine" / f"{batch}.parquet")
    r_path = out / "reports" / f"{batch}.json"
    r_path.parent.mkdir(parents=True, exist_ok=True)
    r_path.write_text(json.dumps({"batch_id": batch, **report.to_dict()}, indent=2, default=str))
    per_file = {f.source_file: f for f in report.files}

    def entries(state: str, **extra) -> list[dict]:
        now, rows = _now(), []
        for p in pending:
            stat = _stat_key(Path(p.options.path))
            rows.append({"digest": p.digest, "path": p.options.path, "batch_id": batch, "ingested_at": now,
                         "state": state, "rows_in": getattr(per_file.get(p.options.path), "rows_in", None),
                         **_stat_fields(stat), **extra})
        return rows

    try:
        result.raise_if_exceeded(q_path)
    except QuarantineThresholdExceeded as err:  # failed on its data: not retried under the same settings
        ledger.record(entries(FAILED, settings=settings_digest(settings), reason=str(err)[:500]))
        raise
    superseded = _superseded_batches(ledger, batch, {p.digest for p in pending})
    validated = {}
    for kind, n_valid in report.valid_by_kind.items():
        if n_valid:
            path = validated_path(out, kind, batch)
            result.write_valid(kind, path)
            drop_older_formats(path)  # this batch as an older version wrote it
            validated[kind] = str(path)
    fault_point("ingest")
    ledger.record(entries(CONSUMED if commit else PENDING))
    for old in superseded:  # a crashed round's batch whose files this batch holds again
        for stale in [*batch_files(out, old), out / "quarantine" / f"{old}.parquet",
                      out / "reports" / f"{old}.json"]:
            stale.unlink(missing_ok=True)
    return IngestResult(batch, [p.options.path for p in pending], skipped, validated, q_path, str(r_path),
                        report.to_dict())


def _superseded_batches(ledger: Ledger, batch: str, digests: set[str]) -> list[str]:
    """Pending batches other than ``batch`` all of whose digests ``batch`` ingests again."""
    members: dict[str, set[str]] = {}
    for digest, entry in ledger.latest().items():
        if entry["state"] == PENDING and entry.get("batch_id") and entry["batch_id"] != batch:
            members.setdefault(entry["batch_id"], set()).add(digest)
    return sorted(b for b, ds in members.items() if ds <= digests)


class AlreadyConsumed(ValueError):
    """Every source was consumed according to the ledger, yet this pipeline holds no validated data."""


def _explain_nothing_new(ledger: Ledger, skipped: list[str], out: Path) -> None:
    """Raise :class:`AlreadyConsumed` when nothing is new because another pipeline (a shared
    ``ledger_path``) or a removed data folder consumed the files: the build would find no pairs."""
    if skipped and ledger.digests() and not validated_files(validated_root(out)):
        raise AlreadyConsumed(
            f"no data for this pipeline: its {len(skipped)} source file(s) are all recorded as consumed in the "
            f"ledger {ledger.path}, but {validated_root(out)} holds no validated data (the ledger is shared with "
            f"another pipeline, or this pipeline's data folder was removed). Give this pipeline its own "
            f"ledger (leave data.ledger_path unset) or remove those entries to ingest the files again.")
