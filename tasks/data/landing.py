"""Ingest: new landing files and explicit sources -> validated tables, quarantine, report, ledger.

Each file (or saved-dataset folder) is ingested once: its sha256 content digest goes into a
JSON-lines ledger after a successful ingest, so a scheduled run takes only new content, a run
with nothing new ingests nothing, and a file whose content changed counts as new (its earlier
rows are not retracted; the builder counts rows repeated across batches once). Explicit sources
are tracked the same way (hub datasets by id, config, split and revision).

Layout under ``out_dir`` (one batch = the files of one ingest, id = digest of their digests)::

    validated/<kind>/<batch>.arrow       what passed, per kind, as Arrow IPC (the builder reads them all)
    quarantine/<batch>.parquet           what failed, with every reason and the raw row
    reports/<batch>.json                 counts, reasons, per-file counts

A batch over ``quarantine_max_share`` writes its quarantine and report, then raises
:class:`~tasks.data.validate.QuarantineThresholdExceeded`; its validated tables are not written
and its files are not entered in the ledger, so fixing the export (or raising the limit) and
re-running ingests them. Re-running a batch rewrites the same files (idempotent).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.heap import retained_heap
from tasks.data.readers import content_digest, detect_format, list_source_files, read_source
from tasks.data.scan import TextScan, scan_text
from tasks.data.settings import IngestSettings, SourceSettings
from tasks.data.validate import ValidationReport, ValidationResult, validate_tables


class Ledger:
    """Content digests already ingested (append-only JSON lines)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def digests(self) -> set[str]:
        return {e["digest"] for e in self.entries()}

    def record(self, entries: list[dict]) -> None:
        """Append entries (each with at least ``digest`` and ``path``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for e in entries:
                f.write(json.dumps(e, sort_keys=True) + "\n")


def ledger_for(settings: IngestSettings, out_dir: str | Path) -> Ledger:
    """The configured ledger; default next to the landing files, else in ``out_dir``."""
    if settings.ledger_path:
        return Ledger(settings.ledger_path)
    if settings.landing_dir:
        return Ledger(Path(settings.landing_dir) / ".alignflow-ledger.jsonl")
    return Ledger(Path(out_dir) / "ledger.jsonl")


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


def _stat_key(path: Path) -> tuple[str, int, int] | None:
    if not path.is_file():
        return None
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def pending_sources(settings: IngestSettings, ledger: Ledger) -> tuple[list[PendingSource], list[str]]:
    """New sources in order (explicit ones first, then landing files by path) and skipped paths.

    A file whose path, size and modification time match a ledger entry is skipped without
    reading it (scheduled runs over a large landing folder stay cheap); any other file is hashed
    and skipped only if its content digest was ingested before.
    """
    entries = ledger.entries()
    done = {e["digest"] for e in entries}
    seen_stat = {(e["path"], e.get("size"), e.get("mtime_ns")) for e in entries if e.get("mtime_ns") is not None}
    candidates: list[SourceSettings] = []
    for src in settings.sources:
        p = Path(src.path)
        if p.is_dir() and src.format in ("auto", "jsonl", "csv", "parquet") and not (p / "dataset_info.json").exists() \
                and not (p / "dataset_dict.json").exists():
            candidates += [src.model_copy(update={"path": str(f)}) for f in list_source_files(p, settings.landing_patterns)]
        else:
            candidates.append(src)
    if settings.landing_dir and Path(settings.landing_dir).exists():
        for f in list_source_files(settings.landing_dir, settings.landing_patterns):
            candidates.append(SourceSettings(path=str(f), kind=settings.landing_kind, layout=settings.landing_layout))
    pending, skipped = [], []
    for src in candidates:
        if _stat_key(Path(src.path)) in seen_stat:
            skipped.append(src.path)
            continue
        digest, scan = _source_digest(src)
        if digest in done:
            skipped.append(src.path)
            continue
        done.add(digest)
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


def read_and_validate(sources: list[SourceSettings], settings: IngestSettings,
                      digests: list[str | None] | None = None,
                      scans: list[TextScan | None] | None = None) -> ValidationResult:
    """Read sources (with their digests and text scans, when known) and validate them as one
    batch (no files written). Raises FileNotFoundError or ValueError for unreadable sources."""
    tables = []
    for src, digest, scan in zip(sources, digests or [None] * len(sources), scans or [None] * len(sources),
                                 strict=True):
        table = read_source(src.path, src.format, split=src.split, config_name=src.config_name, revision=src.revision,
                            digest=digest if digest and not digest.startswith("hub:") else None, scan=scan)
        tables.append((table, src))
    return validate_tables(tables, settings)


def write_quarantine(result: ValidationResult, path: str | Path) -> str:
    """Write the quarantine Parquet (reasons as list<string>)."""
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
    pq.write_table(table, path)
    return str(path)


@retained_heap()
def ingest(settings: IngestSettings, out_dir: str | Path, *, commit: bool = True) -> IngestResult:
    """Ingest new sources into ``out_dir`` (see the module docstring).

    ``commit=False`` leaves the ledger untouched (the caller commits after later steps succeed
    with :meth:`Ledger.record`). Raises QuarantineThresholdExceeded (after writing the
    quarantine and report), FileNotFoundError or ValueError for unreadable sources.
    """
    out = Path(out_dir)
    ledger = ledger_for(settings, out)
    pending, skipped = pending_sources(settings, ledger)
    if not pending:
        return IngestResult(None, [], skipped)
    batch = hashlib.sha256("\n".join(sorted(p.digest for p in pending)).encode()).hexdigest()[:16]
    result = read_and_validate([p.options for p in pending], settings, [p.digest for p in pending],
                               [p.scan for p in pending])
    report: ValidationReport = result.report
    q_path = write_quarantine(result, out / "quarantine" / f"{batch}.parquet")
    r_path = out / "reports" / f"{batch}.json"
    r_path.parent.mkdir(parents=True, exist_ok=True)
    r_path.write_text(json.dumps({"batch_id": batch, **report.to_dict()}, indent=2, default=str))
    result.raise_if_exceeded(q_path)
    validated = {}
    for kind, n_valid in report.valid_by_kind.items():
        if n_valid:
            path = out / "validated" / kind / f"{batch}.arrow"
            result.write_valid(kind, path)
            path.with_suffix(".parquet").unlink(missing_ok=True)  # this batch as an older version wrote it
            validated[kind] = str(path)
    if commit:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        per_file = {f.source_file: f for f in report.files}
        entries = []
        for p in pending:
            stat = _stat_key(Path(p.options.path))
            entries.append({"digest": p.digest, "path": p.options.path, "batch_id": batch, "ingested_at": now,
                            "rows_in": getattr(per_file.get(p.options.path), "rows_in", None),
                            "size": stat[1] if stat else None, "mtime_ns": stat[2] if stat else None})
        ledger.record(entries)
    return IngestResult(batch, [p.options.path for p in pending], skipped, validated, q_path, str(r_path),
                        report.to_dict())
