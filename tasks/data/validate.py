"""Validation with quarantine: every input row ends valid or quarantined with all its reasons.

Pipeline per source: rename columns -> convert a public layout (:mod:`tasks.data.formats`) ->
assign a kind (declared, per-row ``kind`` column, or detected from the columns) -> type the
fields (:mod:`tasks.data.coerce`). Per kind over the whole batch: the pandera schema (lazy, so
every failing check is collected) -> duplicate rows (among rows with no other problem; the
first copy stays) -> split into the validated table and the quarantine. Counts reconcile: ``rows_in == rows_valid + rows_quarantined``, where ``rows_in``
counts readable rows, unreadable ones (broken JSON lines, malformed CSV records) and, for
layouts that expand a record (UltraFeedback completions), the expanded rows.

Quarantine columns: ``source_file, source_row, kind, reasons`` (sorted list of str) and
``raw`` (the source row as JSON text). Reasons are ``<check>:<field>`` (``missing:prompt``,
``blank:response_a``, ``wrong_type:score``, ``invalid_value:choice``, ``out_of_scale:score``,
``too_long:prompt``, ``control_chars:prompt``, ``invalid_utf8:prompt``,
``unparseable_timestamp:created_at``, ...) or row-level (``identical_responses``,
``ranking_not_permutation``, ``duplicate_row``, ``unknown_kind``, ``kind_not_allowed``,
``kind_mismatch``, ``malformed_json``, ``malformed_csv_row``, ``not_an_object``, layout failures).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow

from tasks.data.coerce import LABELS, Problems, coerce_frame, to_json
from tasks.data.formats import convert
from tasks.data.handoff import write_validated
from tasks.data.raw import RawTable
from tasks.data.schemas import (
    LINEAGE,
    OPTIONAL,
    REQUIRED,
    TEXT_FIELDS,
    detect_kind,
    schema_model,
    validated_columns,
)
from tasks.data.settings import KINDS, IngestSettings, SourceSettings

QUARANTINE_COLUMNS = ["source_file", "source_row", "kind", "reasons", "raw"]
KNOWN_COLUMNS = frozenset({f for fields in REQUIRED.values() for f in fields} | set(OPTIONAL) | {"is_chat", "kind"})
"""Columns a native row is read from (any other column is reported as not kept)."""
log = logging.getLogger(__name__)


@dataclass
class FileReport:
    """Counts of one source."""

    source_file: str
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    digest: str | None = None
    notes: list[str] = field(default_factory=list)
    unreadable: str | None = None
    """Why the file could not be read at all (its one quarantine row, ``source_row`` 0), if so."""


@dataclass
class ValidationReport:
    """Counts of one validation batch; ``reasons`` counts quarantined rows per reason."""

    rows_in: int
    rows_valid: int
    rows_quarantined: int
    valid_by_kind: dict[str, int]
    reasons: dict[str, int]
    files: list[FileReport]
    max_share: float

    @property
    def quarantine_share(self) -> float:
        return self.rows_quarantined / self.rows_in if self.rows_in else 0.0

    @property
    def exceeded(self) -> bool:
        """The quarantined share is above the configured maximum."""
        return self.quarantine_share > self.max_share

    def top_reasons(self, k: int = 5) -> list[tuple[str, int]]:
        return list(self.reasons.items())[:k]

    def summary(self) -> str:
        """One line: counts, share and the top reasons."""
        top = ", ".join(f"{r} ({n})" for r, n in self.top_reasons()) or "none"
        return (f"rows in {self.rows_in}, valid {self.rows_valid}, quarantined {self.rows_quarantined} "
                f"({self.quarantine_share:.2%}; limit {self.max_share:.2%}); top reasons: {top}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["quarantine_share"] = self.quarantine_share
        return out


class QuarantineThresholdExceeded(RuntimeError):
    """Too many rows of a batch failed validation. Raised after the quarantine was written."""

    def __init__(self, report: ValidationReport, quarantine_path: str | None = None) -> None:
        self.report = report
        self.quarantine_path = quarantine_path
        where = f" Quarantine written to {quarantine_path}." if quarantine_path else ""
        top = "; ".join(f"{r}: {n} rows" for r, n in report.top_reasons(5))
        super().__init__(
            f"{report.rows_quarantined} of {report.rows_in} rows ({report.quarantine_share:.2%}) failed "
            f"validation, over the limit of {report.max_share:.2%} (data.quarantine_max_share). "
            f"Top reasons: {top}.{where}")


@dataclass
class ValidationResult:
    """Validated tables per kind, the quarantine and the report of one batch.

    The typed rows are kept whole with a mask of the valid ones: :attr:`valid` filters on first
    use, :meth:`write_valid` streams the valid rows to a file without a filtered copy.
    """

    typed: dict[str, tuple[pd.DataFrame, np.ndarray]]
    quarantine: pd.DataFrame
    report: ValidationReport
    _valid: dict[str, pd.DataFrame] | None = None

    @property
    def valid(self) -> dict[str, pd.DataFrame]:
        """Validated rows per kind (columns: :func:`~tasks.data.schemas.validated_columns`)."""
        if self._valid is None:
            self._valid = {k: f if keep.all() else f[keep].reset_index(drop=True) for k, (f, keep) in self.typed.items()}
        return self._valid

    def write_valid(self, kind: str, path: str | Path, rows_per_batch: int = 1 << 16) -> int:
        """Write the valid rows of ``kind`` as a validated hand-off file
        (:mod:`tasks.data.handoff`), a batch of rows at a time; returns the row count."""
        frame, keep = self.typed[kind]
        table = pa_arrow.Table.from_pandas(frame, preserve_index=False)

        def parts():
            for start in range(0, len(frame), rows_per_batch):
                part = table.slice(start, rows_per_batch)
                mask = keep[start:start + rows_per_batch]
                yield part if mask.all() else part.filter(pa_arrow.array(mask))

        write_validated(path, table.schema, parts())
        return int(keep.sum())

    def raise_if_exceeded(self, quarantine_path: str | None = None) -> None:
        """Raise :class:`QuarantineThresholdExceeded` when the share is over the limit."""
        if self.report.exceeded:
            raise QuarantineThresholdExceeded(self.report, quarantine_path)


@dataclass
class _Part:
    """Typed rows of one kind from one source, with their problems and raw rows."""

    kind: str
    typed: pd.DataFrame
    problems: Problems
    raw: pd.DataFrame
    raw_pos: np.ndarray
    file_index: int
    table: RawTable
    names: dict[str, str]
    """Field -> the source's own column name, for reasons (see :func:`_source_names`)."""


def _source_names(conv_fields: dict[str, str], columns: dict[str, str]) -> dict[str, str]:
    """Field -> the column the source calls it: through the layout (``response_b`` is
    ``rejected``), then back through the renames of ``columns`` (source column -> field)."""
    back = {v: k for k, v in columns.items()}
    fields = set(conv_fields) | set(back)
    names = {f: back.get(conv_fields.get(f, f), conv_fields.get(f, f)) for f in fields}
    return {f: n for f, n in names.items() if n != f}


def _in_source_terms(reasons, names: dict[str, str]) -> list[str]:
    """Reasons with their field named as the source names it (sorted, without repeats)."""
    if not names:
        return sorted(set(reasons))
    out = set()
    for r in reasons:
        check, sep, col = r.partition(":")
        out.add(f"{check}:{names.get(col, col)}" if sep else r)
    return sorted(out)


def _renamed(reason: str, columns: dict[str, str]) -> str:
    """A reason naming a source column, with the column's renamed field name."""
    check, _, col = reason.partition(":")
    return f"{check}:{columns.get(col, col)}" if col else reason


def _isna_scalar(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _assign_kinds(frame: pd.DataFrame, declared: str | None, implied: str | None, allowed: set[str],
                  problems: Problems) -> tuple[np.ndarray, list[str]]:
    """Kind of each row (object array; None where unknown) and notes about the source."""
    n, notes = len(frame), []
    row_kind = frame["kind"] if "kind" in frame.columns else None
    if declared or implied:
        kinds = np.full(n, declared or implied, dtype=object)
        if row_kind is not None and declared:
            rk = row_kind.astype("str")
            problems.add((rk.notna() & (rk.str.strip().str.lower() != declared)).to_numpy(bool), "kind_mismatch")
    elif row_kind is not None:
        kinds = row_kind.astype("str").str.strip().str.lower().to_numpy(dtype=object, na_value=None)
        known = np.isin(kinds, KINDS)
        problems.add(~known, "unknown_kind")
        kinds = np.where(known, kinds, None)
    else:
        kind = detect_kind(frame.columns)
        if kind is None:
            notes.append(f"could not detect the kind from columns {sorted(map(str, frame.columns))}")
            problems.add(np.ones(n, bool), "unknown_kind")
        kinds = np.full(n, kind, dtype=object)
    if declared == "demonstration" and "label" in frame.columns and n:
        # A thumbs file read as demonstrations: a thumbs-down answer is not one a person approved.
        labels = frame["label"].map(lambda v: None if _isna_scalar(v) else str(v).strip().lower()).map(LABELS)
        down = (labels == False).to_numpy(bool)  # noqa: E712 - element-wise; unmapped values are NaN
        if down.any():
            problems.add(down, "thumbs_down:label")
            notes.append(f"{int(down.sum())} rows have a thumbs-down label: not demonstrations, quarantined "
                         "(reason thumbs_down); ingest the file as kind binary to learn from them")
    banned = [k for k in KINDS if k not in allowed]
    if banned and n:
        problems.add(pd.Series(kinds, dtype=object).isin(banned).to_numpy(bool), "kind_not_allowed")
    return kinds, notes


def _quarantine_rows(quarantine: list[dict], table: RawTable, raw: pd.DataFrame, raw_pos: np.ndarray,
                     rows: np.ndarray, local: np.ndarray, pos: np.ndarray, reason: np.ndarray, file_index: int,
                     names: dict[str, str]) -> None:
    """Quarantine untyped rows (``local`` positions) with their reasons from (``pos``, ``reason``)."""
    by_row = pd.Series(reason, dtype=object).groupby(pos).agg(lambda r: sorted(set(r))) if len(pos) else {}
    records = raw.iloc[raw_pos].to_dict("records")
    for i, row, rp, record in zip(local.tolist(), rows.tolist(), raw_pos.tolist(), records, strict=True):
        text = table.raw_json(rp) if rp in table.raw_rows else to_json(record)
        quarantine.append({"source_file": table.source_file, "source_row": int(row), "kind": None,
                           "reasons": _in_source_terms(by_row.get(i, []), names), "raw": text, "_file": file_index})


def _prepare(table: RawTable, opts: SourceSettings, settings: IngestSettings, file_index: int,
             quarantine: list[dict], report: FileReport) -> list[_Part]:
    """One source -> typed parts per kind; rows that fail before typing go to ``quarantine``."""
    for number, reason, raw in table.errors:
        quarantine.append({"source_file": table.source_file, "source_row": number, "kind": opts.kind,
                           "reasons": [reason], "raw": raw, "_file": file_index})
    raw = table.frame.rename(columns=opts.columns) if opts.columns else table.frame
    raw = raw.reset_index(drop=True)
    conv = convert(raw, opts.layout, score_field=opts.score_field)
    names = _source_names(conv.fields, opts.columns)
    back = {v: k for k, v in opts.columns.items()}
    read_reasons = {pos: [_renamed(r, opts.columns) for r in reasons] for pos, reasons in table.row_reasons.items()}
    for pos, reason in conv.failures:  # layout reasons name raw columns: only renames to undo
        quarantine.append({"source_file": table.source_file, "source_row": int(table.rows[pos]),
                           "kind": conv.kind or opts.kind,
                           "reasons": _in_source_terms([reason, *read_reasons.get(pos, [])], back | names),
                           "raw": table.raw_json(pos, raw), "_file": file_index})
    report.rows_in = len(table.errors) + len(conv.frame) + len(conv.failures)
    pre = Problems()
    kinds, notes = _assign_kinds(conv.frame, opts.kind, conv.kind, set(settings.kinds), pre)
    unused = [back.get(c, c) for c in map(str, raw.columns) if c not in conv.used and c not in conv.fields.values()
              and (conv.kind is not None or c not in KNOWN_COLUMNS)]
    if table.unreadable:  # nothing was read: nothing to say about its columns
        notes, unused = [], []
    report.notes = [*table.notes, *conv.notes, *notes] + (
        [f"columns not kept: {', '.join(sorted(unused))} (rename them to fields with `columns`, or they are "
         f"left out of the validated table)"] if unused else [])
    if read_reasons:  # reasons found while reading follow the raw row into its converted rows
        hits = np.flatnonzero(np.isin(conv.src, list(read_reasons)))
        for i in hits:
            for r in read_reasons[int(conv.src[i])]:
                pre.add([i], r)
    pre_pos, pre_reason = pre.arrays()
    parts = []
    kind_values = pd.Series(kinds, dtype=object)
    for kind in [k for k in KINDS if (kinds == k).any()] + ([None] if pd.isna(kind_values).any() else []):
        sel = np.flatnonzero(kind_values.isna().to_numpy() if kind is None else (kinds == kind))
        rows = table.rows[conv.src[sel]]
        if kind is None:  # rows without a kind cannot be typed: straight to quarantine
            _quarantine_rows(quarantine, table, raw, conv.src[sel], rows, sel, pre_pos, pre_reason, file_index, names)
            continue
        subset = conv.frame if len(sel) == len(conv.frame) else conv.frame.iloc[sel].reset_index(drop=True)
        problems = Problems()
        typed = coerce_frame(subset, kind, settings, problems)
        if pre:  # kind-level reasons (mismatch, not allowed) of these rows, renumbered
            lookup = np.full(len(conv.frame), -1)
            lookup[sel] = np.arange(len(sel))
            hit = lookup[pre_pos] >= 0
            for r in set(pre_reason[hit]):
                problems.add(lookup[pre_pos[hit & (pre_reason == r)]], r)
        # one value per part: categorical here, plain text in the written file
        typed["source_file"] = pd.Categorical.from_codes(np.zeros(len(typed), np.int8), [table.source_file])
        typed["source_row"] = rows.astype(np.int64)
        typed["kind"] = pd.Categorical.from_codes(np.zeros(len(typed), np.int8), [kind])
        parts.append(_Part(kind, typed, problems, raw, conv.src[sel], file_index, table, names))
    return parts


def _quarantine_file(table: RawTable, opts: SourceSettings, err: Exception, file_index: int,
                     quarantine: list[dict], report: FileReport) -> None:
    """Every row of a source that validation failed on (a defect, logged): ``validation_error``."""
    message = f"{type(err).__name__}: {err}"[:500]
    report.rows_in = table.rows_in
    report.notes = [*table.notes, f"not validated (validation_error): {message}"]
    for number, reason, raw in table.errors:
        quarantine.append({"source_file": table.source_file, "source_row": number, "kind": opts.kind,
                           "reasons": [reason], "raw": raw, "_file": file_index})
    for pos, row in enumerate(table.rows.tolist()):
        try:
            text = table.raw_json(pos)
        except Exception:  # noqa: BLE001 - the row's own text is what failed
            text = json.dumps({"error": message})
        quarantine.append({"source_file": table.source_file, "source_row": int(row), "kind": opts.kind,
                           "reasons": ["validation_error"], "raw": text, "_file": file_index})


def _schema_problems(frame: pd.DataFrame, kind: str, settings: IngestSettings, problems: Problems) -> None:
    lo, hi = settings.rating_scale
    model = schema_model(kind, settings.max_text_chars, float(lo), float(hi))
    try:
        model.validate(frame, lazy=True)
    except pa.errors.SchemaErrors as err:
        fc = err.failure_cases
        for (context, column, check), group in fc.groupby(["schema_context", "column", "check"], dropna=False):
            check = str(check)
            if check == "not_nullable":
                reason = f"missing:{column}"
            elif check.startswith("dtype("):
                reason = f"wrong_type:{column}"
            elif context == "DataFrameSchema":
                reason = check
            else:
                reason = f"{check}:{column}"
            index = group["index"]
            if index.isna().any():  # a column-wide failure: every row
                problems.add(np.ones(len(frame), bool), reason)
            else:
                problems.add(np.unique(index.astype(np.int64).to_numpy()), reason)


def _duplicate_problems(frame: pd.DataFrame, kind: str, problems: Problems) -> None:
    """``duplicate_row`` on rows equal to an earlier row, among rows with no other problem (typing
    turns bad values into nulls, which would make unrelated bad rows look alike).

    Column by column, most distinctive first, only rows that still have a twin stay candidates,
    so with timestamps or unique texts the later columns are compared on a handful of rows.
    """
    cols = [c for c in validated_columns(kind) if c not in LINEAGE]
    cols = sorted(cols, key=lambda c: (c != "created_at", c not in TEXT_FIELDS[kind], c))
    eligible = np.ones(len(frame), bool)
    eligible[problems.arrays()[0]] = False
    cand = np.flatnonzero(eligible)
    group = np.zeros(len(cand), np.int64)
    for col in cols:
        if len(cand) < 2:
            return
        values = frame[col]
        if values.dtype == object:  # list fields: compare their JSON text
            codes = pd.factorize(values.iloc[cand].map(to_json))[0]
        elif len(cand) > len(frame) // 2:
            codes = pd.factorize(values)[0][cand]
        else:
            codes = pd.factorize(values.iloc[cand])[0]
        group = pd.factorize(group * (int(codes.max()) + 2) + codes + 1)[0]
        twin = np.bincount(group)[group] > 1
        cand, group = cand[twin], group[twin]
    later = pd.Series(group).duplicated(keep="first").to_numpy()
    problems.add(cand[later], "duplicate_row")


def _reasons_by_row(problems: Problems) -> pd.Series:
    """Sorted reasons per failing position; ``missing:F`` is dropped where F has a sharper reason.

    Works on integer codes (the distinct reasons are few, the positions many): one sort of
    ``position * reasons + reason rank`` dedups and orders everything at once.
    """
    pos, reasons = problems.arrays()
    if not len(pos):
        return pd.Series([], dtype=object)
    names, code = np.unique(reasons.astype(str), return_inverse=True)  # names sorted: code order = text order
    split = [str(r).split(":", 1) for r in names]
    fields, field_code = np.unique([p[1] if len(p) == 2 else "" for p in split], return_inverse=True)
    has_field = np.array([len(p) == 2 for p in split], bool)
    missing = np.array([str(r).startswith("missing:") for r in names], bool)
    key = np.unique(pos.astype(np.int64) * len(names) + code.reshape(-1))
    pos, code = key // len(names), key % len(names)
    fkey = pos * len(fields) + field_code.reshape(-1)[code]
    sharp = fkey[has_field[code] & ~missing[code]]
    keep = ~(missing[code] & np.isin(fkey, sharp))
    pos, code = pos[keep], code[keep]
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    texts = names[code].tolist()
    bounds = [*starts.tolist(), len(pos)]
    lists = [texts[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return pd.Series(lists, index=pd.Index(pos[starts], name="pos"), dtype=object, name="reason")


def validate_tables(tables: list[tuple[RawTable, SourceSettings]], settings: IngestSettings) -> ValidationResult:
    """Validate raw tables (each with its source options) as one batch.

    Never raises for bad rows: they are quarantined. Duplicates are found across the whole
    batch (the first copy in source order stays valid). Call
    :meth:`ValidationResult.raise_if_exceeded` after writing the quarantine.
    """
    quarantine: list[dict] = []
    files = [FileReport(t.source_file, digest=t.digest, unreadable=t.unreadable) for t, _ in tables]
    by_kind: dict[str, list[_Part]] = {}
    for i, (table, opts) in enumerate(tables):
        start = len(quarantine)
        try:
            prepared = _prepare(table, opts, settings, i, quarantine, files[i])
        except Exception as err:  # noqa: BLE001 - a source this code cannot handle must not stop the batch
            log.warning("cannot validate %s", table.source_file, exc_info=err)
            del quarantine[start:]
            _quarantine_file(table, opts, err, i, quarantine, files[i])
            continue
        for part in prepared:
            by_kind.setdefault(part.kind, []).append(part)
    typed: dict[str, tuple[pd.DataFrame, np.ndarray]] = {}
    for kind, parts in by_kind.items():
        frame = parts[0].typed if len(parts) == 1 else pd.concat([p.typed for p in parts], ignore_index=True)
        problems, offsets = Problems(), np.cumsum([0] + [len(p.typed) for p in parts])
        for part, off in zip(parts, offsets, strict=False):
            problems.extend(part.problems, int(off))
        _schema_problems(frame, kind, settings, problems)
        if settings.duplicates == "quarantine":
            _duplicate_problems(frame, kind, problems)
        reasons = _reasons_by_row(problems)
        bad_pos = reasons.index.to_numpy(np.int64)
        which = np.searchsorted(offsets, bad_pos, side="right") - 1
        for part_no, part in enumerate(parts):
            local = bad_pos[which == part_no] - offsets[part_no]
            files[part.file_index].rows_valid += len(part.typed) - len(local)
            if not len(local):
                continue
            raw_pos = part.raw_pos[local]
            raws = part.raw.iloc[raw_pos].to_dict("records")
            rows = part.typed["source_row"].to_numpy()[local]
            for row, why, raw, pos in zip(rows, reasons.iloc[np.flatnonzero(which == part_no)], raws, raw_pos,
                                          strict=True):
                text = part.table.raw_json(int(pos)) if int(pos) in part.table.raw_rows else to_json(raw)
                quarantine.append({"source_file": files[part.file_index].source_file, "source_row": int(row),
                                   "kind": kind, "reasons": _in_source_terms(why, part.names), "raw": text,
                                   "_file": part.file_index})
        keep = np.ones(len(frame), bool)
        keep[bad_pos] = False
        typed[kind] = (frame, keep)
    qframe = pd.DataFrame(quarantine, columns=[*QUARANTINE_COLUMNS, "_file"])
    per_file = qframe["_file"].value_counts()
    for i, f in enumerate(files):
        f.rows_quarantined = int(per_file.get(i, 0))
    qframe = qframe.drop(columns="_file")
    qframe["source_row"] = qframe["source_row"].astype(np.int64)
    counts = Counter(r for reasons in qframe["reasons"] for r in reasons)
    report = ValidationReport(
        rows_in=sum(f.rows_in for f in files), rows_valid=sum(int(k.sum()) for _, k in typed.values()),
        rows_quarantined=len(qframe), valid_by_kind={kind: int(k.sum()) for kind, (_, k) in typed.items()},
        reasons=dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))), files=files,
        max_share=settings.quarantine_max_share)
    return ValidationResult(typed, qframe, report)
