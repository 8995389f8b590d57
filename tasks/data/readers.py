"""Read feedback exports into raw tables: JSONL/JSON, CSV/TSV, Parquet, ``datasets`` folders, hub ids.

A reader never fails on a bad row: a JSON line that does not parse, a CSV record with the
wrong number of fields or a line that is not an object becomes a read error with its row
number, so validation can quarantine it while the rest of the file goes on. Bytes that are not
UTF-8 decode to U+FFFD, which validation reports as ``invalid_utf8:<field>``.

Row numbers (``source_row``) are 1-based: the line number in JSONL files; in CSV files the
record number counting the header as 1 (the line number when no value spans lines); the row
index + 1 in Parquet files and datasets. Raises FileNotFoundError for a missing path and
:class:`UnreadableSource` (a ValueError) for a file it cannot read at all (a corrupt Parquet
file, one whose rows would take more than :data:`MAX_DECOMPRESSED_BYTES` in memory).

Hostile input is bounded: a line longer than :data:`~tasks.data.scan.MAX_LINE_BYTES` is a
``line_too_long`` read error, never held whole; a row nesting arrays/objects deeper than
:data:`~tasks.data.scan.MAX_NESTING` is a ``too_deeply_nested`` read error and never reaches
Arrow's JSON reader, which recurses on the C stack (near 10,000 levels it kills the process).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from tasks.data.coerce import to_json
from tasks.data.scan import (
    MAX_COLUMNS,
    MAX_LINE_BYTES,
    MAX_NESTING,
    PatchedFile,
    TextScan,
    nests_deeper,
    read_spans,
    scan_text,
    split_json_array,
    write_repaired,
)

log = logging.getLogger(__name__)

try:  # orjson (a Prefect dependency) parses the slow path about twice as fast; json is the fallback
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - exercised only without orjson
    _loads = json.loads

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv",
                ".parquet": "parquet", ".pq": "parquet"}
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
MAX_DECOMPRESSED_BYTES = 1 << 31
"""Largest in-memory size (Arrow bytes) of one Parquet file's rows: a small file that expands
past it (a compression or dictionary bomb) is refused as ``too_large_decompressed``."""
MAX_JSON_ARRAY_BYTES = 1 << 30
"""Largest ``.json`` array document (it is parsed whole); JSON lines have no such limit."""
RAW_MAX_CHARS = 65536
"""Longest ``raw`` text kept for a row that could not be read (longer text is cut, marked)."""


class UnreadableSource(ValueError):
    """A source that cannot be read at all; ``reason`` is its quarantine reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class RawTable:
    """Rows of one source as read, before any typing."""

    frame: pd.DataFrame
    """The readable rows, columns as in the source, index 0..n-1."""
    source_file: str
    """Path (or hub id) the rows came from."""
    rows: np.ndarray
    """1-based row number of each frame row (see the module docstring)."""
    errors: list[tuple[int, str, str]] = field(default_factory=list)
    """Rows that could not be read: (row number, reason, raw text)."""
    digest: str | None = None
    """Content digest of the source (sha256), when it is a local file or folder."""
    row_reasons: dict[int, list[str]] = field(default_factory=dict)
    """Reasons found while reading, by frame position (e.g. ``invalid_utf8:<field>``)."""
    raw_rows: dict[int, object] = field(default_factory=dict)
    """What the quarantine shows as the raw row, by frame position, where the frame's copy
    was altered to be readable (invalid bytes masked)."""
    notes: list[str] = field(default_factory=list)
    """What the report should say about the source (e.g. why it could not be read)."""
    unreadable: str | None = None
    """The reason the source could not be read at all (then its only row is a read error, row 0)."""

    def raw_json(self, pos: int, frame: pd.DataFrame | None = None) -> str:
        """The raw row at frame position ``pos`` as JSON text (``frame``: a renamed view of it)."""
        if pos in self.raw_rows:
            return json.dumps(self.raw_rows[pos], ensure_ascii=False, default=str)
        return to_json((self.frame if frame is None else frame).iloc[pos].to_dict())

    @property
    def rows_in(self) -> int:
        return len(self.frame) + len(self.errors)


def content_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative paths and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    h = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(item.relative_to(path)).encode() + b"\0" + content_digest(item).encode())
    return h.hexdigest()


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / m).exists() for m in DATASET_MARKERS)


def detect_format(path: str | Path) -> str:
    """``jsonl``, ``csv``, ``parquet``, ``dataset`` or ``hub`` from the path. Raises ValueError if unknown."""
    p = Path(path)
    if p.is_dir():
        if is_saved_dataset(p):
            return "dataset"
        raise ValueError(f"{path}: a folder of files, not one source (list it with list_source_files)")
    if p.suffix.lower() in FILE_FORMATS:
        return FILE_FORMATS[p.suffix.lower()]
    if not p.exists() and str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        return "hub"
    raise ValueError(f"{path}: unknown format (extensions: {sorted(FILE_FORMATS)}, or a saved dataset folder)")


def outside(path: str | Path, folder: str | Path) -> bool:
    """``path`` resolves (through symlinks, at any level) to somewhere outside ``folder``."""
    return not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def list_source_files(folder: str | Path, patterns: list[str], refused: list[Path] | None = None,
                      warn: bool = True) -> list[Path]:
    """Files under ``folder`` matching any pattern, and saved-dataset folders, sorted by path.

    Hidden files and folders (name starting with '.') are skipped. A symlink that resolves
    outside ``folder`` is refused: not listed, never opened (not even hashed), logged as a
    warning (unless ``warn`` is False) and appended to ``refused`` when given; links that stay
    inside are followed.
    Folder links are not descended into (``rglob``).
    """
    folder = Path(folder)
    found: set[Path] = set()
    escaping: set[Path] = set()

    def inside(p: Path) -> bool:
        if outside(p, folder):
            escaping.add(p)
            return False
        return True

    datasets_dirs = sorted(p for p in [folder, *folder.rglob("*")]
                           if not any(part.startswith(".") for part in p.relative_to(folder).parts)
                           and inside(p) and is_saved_dataset(p))
    for pattern in patterns:
        for p in folder.rglob(pattern):
            rel = p.relative_to(folder).parts
            if not any(part.startswith(".") for part in rel) and inside(p) and p.is_file() and \
                    not any(d in p.parents for d in datasets_dirs):
                found.add(p)
    found.update(datasets_dirs)
    for p in sorted(escaping) if warn else []:
        log.warning("refused %s: a symlink that resolves outside %s (not read)", p, folder)
    if refused is not None:
        refused.extend(sorted(escaping))
    return sorted(found)


def _utf8(data: bytes) -> bytes:
    """The bytes as valid UTF-8 (BOM removed); invalid sequences become U+FFFD."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace").encode("utf-8")


def _frame(records: list[dict]) -> pd.DataFrame:
    """Records as a frame; the explicit index keeps rows that are empty objects."""
    return pd.DataFrame.from_records(records, index=pd.RangeIndex(len(records))) if records else pd.DataFrame()


def _raw_text(line: bytes) -> str:
    return json.dumps(_cut(line.decode("utf-8", errors="replace")))


def _without_surrogates(value):
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    return value


def read_jsonl(path: str | Path, digest: str | None = None, scan: TextScan | None = None) -> RawTable:
    """One JSON object per line (``.json`` files holding one JSON array are read as such).

    Fast path: a streaming scan (digest, lines, invalid UTF-8), then pyarrow's JSON reader on the
    file itself, with invalid bytes masked; the few lines that held them are re-read and decoded
    with U+FFFD, so validation reports ``invalid_utf8:<field>``. When pyarrow refuses the file
    (a broken line, a value whose type changes between rows, a line that is not an object,
    blank lines), lines are parsed one by one and bad ones become read errors
    (``malformed_json``, ``not_an_object``), a chunk of lines at a time. ``scan``: the file's
    :func:`~tasks.data.scan.scan_text`, when already made (it must be of the current content).
    """
    path = Path(path)
    scan = scan or scan_text(path, digest=digest)
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix.lower() == ".json" and (head[:1] == b"[" or head[:4] == codecs.BOM_UTF8 + b"["):
        if path.stat().st_size > MAX_JSON_ARRAY_BYTES:  # parsed whole, several copies in memory
            raise UnreadableSource("file_too_large", f"{path.name}: a JSON array document over "
                                   f"{MAX_JSON_ARRAY_BYTES} bytes (write JSON lines instead)")
        out = _read_json_array(path, _utf8(path.read_bytes()))
    elif not scan.blank_lines and not scan.bom and scan.lines and not scan.deep_lines and not scan.non_object_lines and \
            scan.longest_line <= MAX_LINE_BYTES and (table := _arrow_json(path, scan)) is not None:
        return table
    else:
        out = _read_lines(path, bounded=scan.longest_line <= MAX_LINE_BYTES)
    out.digest = scan.digest
    return out


STRING_FIELDS = frozenset({"prompt", "response", "response_a", "response_b", "choice", "annotator_id", "source",
                           "conversation_id", "created_at", "kind", "chosen", "rejected", "instruction"})
"""Fields read as text when the first block shows text or nothing but nulls in them."""


SCORE_FIELDS = frozenset({"score", "score_chosen", "score_rejected"})
"""Numeric fields read as float64 when the first MiB shows only integers in them (ratings of 4
and 4.5 in one file)."""


def _distinct_keys(head: bytes, limit: int = MAX_COLUMNS) -> int | None:
    """Distinct object keys (any level) in the lines of ``head``, counted up to ``limit + 1``;
    None when a line does not parse as an object."""
    keys: set[str] = set()
    for line in head.splitlines():
        try:
            value = _loads(line)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        stack = [value]
        while stack and len(keys) <= limit:
            v = stack.pop()
            if isinstance(v, dict):
                keys.update(v)
                stack.extend(x for x in v.values() if isinstance(x, (dict, list)))
            elif isinstance(v, list):
                stack.extend(x for x in v if isinstance(x, (dict, list)))
        if len(keys) > limit:
            break
    return len(keys)


def _probe_schema(path: Path, scan: TextScan) -> pa.Schema | None:
    """The file's schema from its first MiB, for the streaming reader; None when the head has
    more than MAX_COLUMNS distinct keys (Arrow's type inference is quadratic in them) or does
    not read. Text fields stay text even when only nulls or timestamps show in the head."""
    with (PatchedFile(path, scan.bad_bytes) if len(scan.bad_bytes) else open(path, "rb")) as f:
        head = f.read(1 << 20)
    head = head[: head.rfind(b"\n") + 1] or head
    distinct = _distinct_keys(head)
    if distinct is None or distinct > MAX_COLUMNS:
        return None
    try:
        probe = pajson.read_json(io.BytesIO(head)).schema
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    fields = []
    for f in probe:
        if f.name in STRING_FIELDS and (pa.types.is_string(f.type) or pa.types.is_null(f.type)
                                        or pa.types.is_timestamp(f.type)):
            f = f.with_type(pa.string())
        elif f.name in SCORE_FIELDS and pa.types.is_integer(f.type):
            f = f.with_type(pa.float64())
        fields.append(f)
    return pa.schema(fields)


JSON_BLOCK_BITS = 22
"""log2 of the smallest JSON block. For a 489 MiB file (424 MiB as Arrow), 1 MiB blocks made
the reader's per-block buffers churn: 1.4-2.9 s, most of it in the kernel; 4 MiB: 0.7-1.0 s
and 570-590 MiB of fresh pages; 8 MiB: 0.8-0.9 s, 640 MiB; 16-32 MiB: 1.1-1.6 s, 720-890 MiB."""


def _read_arrow_json(path: Path, scan: TextScan) -> pa.Table | None:
    """Stream the file through pyarrow (memory: the table plus a few blocks) with the schema of
    its first MiB, or None (the caller reads it line by line) when a later row brings a field
    or a type the head did not show. Never inferred past the head: pyarrow's inference takes
    time quadratic in the distinct keys (20,000 keys over 20,000 lines: 64 s), which a hostile
    file could make hours. A block must hold the longest line."""
    block = 1 << max(JSON_BLOCK_BITS, int(2 * scan.longest_line + 1).bit_length())
    options = pajson.ReadOptions(block_size=block)
    schema = _probe_schema(path, scan)
    if schema is None:
        return None
    source = PatchedFile(path, scan.bad_bytes) if len(scan.bad_bytes) else str(path)
    try:
        parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error")
        return pajson.open_json(source, read_options=options, parse_options=parse).read_all()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    finally:
        if not isinstance(source, str):
            source.close()


def _arrow_json(path: Path, scan: TextScan) -> RawTable | None:
    """The file through pyarrow, or None when pyarrow refuses it.

    Lines that held invalid UTF-8 were read with those bytes masked as '?'; each is re-read,
    decoded with U+FFFD and compared field by field, so the row gets ``invalid_utf8:<field>``
    for the fields that differ and its quarantine record shows the decoded line. The typed
    columns are left alone (no copy of a column for a few bad rows).
    """
    table = _read_arrow_json(path, scan)
    if table is None or table.num_rows != scan.lines or type_depth(table.schema) > MAX_NESTING or \
            table.num_columns > MAX_COLUMNS:
        return None  # deep or wide rows: line by line, where each is quarantined on its own
    out = RawTable(table.to_pandas(), str(path), np.arange(1, scan.lines + 1), digest=scan.digest)
    if len(scan.bad_lines):
        picked = np.zeros(table.num_rows, bool)  # a filter, unlike a take, does not concatenate the chunks
        picked[scan.bad_lines] = True  # the scan lists them in order, once each
        masked = table.filter(pa.array(picked)).to_pylist()
        for row, line, seen in zip(scan.bad_lines.tolist(), read_spans(path, scan.bad_spans), masked, strict=True):
            try:
                value = _loads(line.decode("utf-8", "replace").encode("utf-8"))
            except ValueError:
                value = None
            if isinstance(value, dict):
                fields = sorted(k for k in value if not _same(value[k], seen.get(k)))
                out.row_reasons[row] = [f"invalid_utf8:{k}" for k in fields] or ["invalid_utf8"]
                out.raw_rows[row] = value
            else:
                out.row_reasons[row] = ["invalid_utf8"]
                out.raw_rows[row] = line.decode("utf-8", "replace")
    return out


def _same(a, b) -> bool:
    if a is b:
        return True
    a_na, b_na = a is None or (isinstance(a, float) and a != a), b is None or (isinstance(b, float) and b != b)
    if a_na or b_na:
        return a_na and b_na
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # arrays and the like: compare as JSON
        return json.dumps(a, default=str) == json.dumps(b, default=str)


def type_depth(schema_or_type) -> int:
    """Nesting depth of an Arrow schema or type (a flat column is 0); iterative, any depth."""
    stack = [(t, 1) for t in (schema_or_type.types if isinstance(schema_or_type, pa.Schema) else [schema_or_type])]
    deepest = 0
    while stack:
        t, d = stack.pop()
        n = getattr(t, "num_fields", 0)
        if n:
            deepest = max(deepest, d)
            stack.extend((t.field(i).type, d + 1) for i in range(n))
    return deepest


class _TooDeep(ValueError):
    pass


def _parse_line(line: bytes):
    """A JSON line as a Python value; raises ValueError if it does not parse (_TooDeep when it
    nests deeper than MAX_NESTING: checked before parsing, since parsers recurse per level)."""
    if nests_deeper(line):
        raise _TooDeep
    try:
        return _loads(line)
    except ValueError:
        # invalid UTF-8 becomes U+FFFD; the stdlib also takes lone surrogate escapes (-> U+FFFD)
        return _without_surrogates(json.loads(line.decode("utf-8", "replace")))


class _FieldBudget:
    """Distinct field names of a file, capped at MAX_COLUMNS: a row that brings the total over
    is refused (``too_many_fields``), so no row can make the table arbitrarily wide."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def admit(self, record: dict) -> bool:
        if len(record) > MAX_COLUMNS:
            return False
        if self.names.issuperset(record):
            return True
        if len(self.names | record.keys()) > MAX_COLUMNS:
            return False
        self.names.update(record)
        return True


def _cut(text: str, limit: int = RAW_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [cut: {len(text)} characters]"


def _raw_json_value(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= RAW_MAX_CHARS else json.dumps(_cut(text))


def _lines(f) -> Iterator[tuple[int, bytes, int | None]]:
    """(line number, line, None), or for a line over MAX_LINE_BYTES (line number, its first
    bytes, its length): such a line is read past in pieces, never held whole."""
    number = 0
    while line := f.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield number, line, None
            continue
        size = len(line)
        while more := f.readline(1 << 20):
            size += len(more)
            if more.endswith(b"\n"):
                break
        yield number, line[:1000], size


def _read_lines(path: Path, chunk: int = 1 << 16, bounded: bool = False) -> RawTable:
    """Line by line, in chunks of rows turned into frames as they fill (so text is held as Arrow
    strings, not Python objects, for all but one chunk). ``bounded``: the scan found no line
    over MAX_LINE_BYTES (the file's own line iterator is then safe, and faster)."""
    frames, records, rows, errors = [], [], [], []
    fields = _FieldBudget()
    with path.open("rb") as f:
        for number, line, size in (zip(itertools.count(1), f, itertools.repeat(None)) if bounded else _lines(f)):
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if size is not None:
                errors.append((number, "line_too_long", json.dumps(
                    f"{line.decode('utf-8', 'replace')}... [cut: the line has {size} bytes]")))
                continue
            if not line.strip():
                continue
            try:
                value = _parse_line(line)
            except _TooDeep:
                errors.append((number, "too_deeply_nested", _raw_text(line.rstrip(b"\r\n"))))
                continue
            except ValueError:
                errors.append((number, "malformed_json", _raw_text(line.rstrip(b"\r\n"))))
                continue
            if isinstance(value, dict) and not fields.admit(value):
                errors.append((number, "too_many_fields", _raw_text(line.rstrip(b"\r\n"))))
            elif isinstance(value, dict):
                records.append(value)
                rows.append(number)
                if len(records) == chunk:
                    frames.append(_frame(records))
                    records = []
            else:
                errors.append((number, "not_an_object", _raw_text(line.rstrip(b"\r\n"))))
    if records or not frames:
        frames.append(_frame(records))
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return RawTable(frame, str(path), np.asarray(rows, dtype=np.int64), errors)


def _read_json_array(path: Path, data: bytes) -> RawTable:
    """A ``.json`` file holding one array of objects. When it nests deeper than MAX_NESTING
    anywhere, or does not parse as a whole, its elements are cut apart unparsed and each is
    parsed (or quarantined: ``too_deeply_nested``, ``malformed_json``) on its own."""
    values, parts = None, None
    if nests_deeper(data, MAX_NESTING + 1):
        parts = split_json_array(data)
    else:
        try:
            values = _loads(data)
        except ValueError:
            parts = split_json_array(data)
    if parts is not None:
        return _json_elements(path, parts)
    if values is None or not isinstance(values, list):
        reason = "malformed_json" if values is None else "not_an_object"
        return RawTable(pd.DataFrame(), str(path), np.zeros(0, np.int64), [(1, reason, _raw_text(data[:2000]))])
    fields = _FieldBudget()
    keep = [i for i, v in enumerate(values) if isinstance(v, dict) and fields.admit(v)]
    kept = set(keep)
    errors = [(i + 1, "not_an_object" if not isinstance(v, dict) else "too_many_fields",
               _raw_json_value(v) if not isinstance(v, dict) else json.dumps("(not shown)"))
              for i, v in enumerate(values) if i not in kept]
    frame = _frame([values[i] for i in keep])
    return RawTable(frame, str(path), np.asarray(keep, dtype=np.int64) + 1, errors)


def _json_elements(path: Path, parts: list[bytes]) -> RawTable:
    """Array elements parsed one by one (row number = position in the array, 1-based)."""
    values, errors = [], []
    for i, part in enumerate(parts):
        try:
            values.append(_parse_line(part))
            continue
        except _TooDeep:
            errors.append((i + 1, "too_deeply_nested", _raw_text(part)))
        except ValueError:
            errors.append((i + 1, "malformed_json", _raw_text(part)))
        values.append(None)
    fields = _FieldBudget()
    for i, v in enumerate(values):
        if isinstance(v, dict) and not fields.admit(v):
            values[i] = None
            errors.append((i + 1, "too_many_fields", json.dumps("(not shown)")))
    bad = {row for row, _, _ in errors}
    keep = [i for i, v in enumerate(values) if i + 1 not in bad and isinstance(v, dict)]
    errors += [(i + 1, "not_an_object", _raw_json_value(v)) for i, v in enumerate(values)
               if i + 1 not in bad and not isinstance(v, dict)]
    return RawTable(_frame([values[i] for i in keep]), str(path), np.asarray(keep, dtype=np.int64) + 1, sorted(errors))


def read_csv(path: str | Path, delimiter: str | None = None, digest: str | None = None,
             scan: TextScan | None = None) -> RawTable:
    """A CSV (or ``.tsv``) file with a header; every value is read as text, empty cells are missing.

    Records with the wrong number of fields become ``malformed_csv_row`` read errors. List
    fields (``responses``, ``ranking``) and chat prompts are JSON text in their cells. A file
    that is valid UTF-8 is parsed in place; otherwise a temporary copy with U+FFFD for the
    invalid bytes is parsed (validation reports ``invalid_utf8:<field>``). ``scan``: as in
    :func:`read_jsonl`.
    """
    path = Path(path)
    scan = scan or scan_text(path, digest=digest)
    if not scan.lines:
        return RawTable(pd.DataFrame(), str(path), np.zeros(0, np.int64), digest=scan.digest)
    if len(scan.bad_bytes) or scan.bom:  # parse a repaired temporary copy (disk, not memory)
        with tempfile.NamedTemporaryFile(suffix=".csv") as tmp:
            write_repaired(path, tmp)
            tmp.flush()
            out = _read_csv_file(Path(tmp.name), delimiter or _delimiter(path), scan.longest_line)
        out.source_file = str(path)
    else:
        out = _read_csv_file(path, delimiter or _delimiter(path), scan.longest_line)
    out.digest = scan.digest
    return out


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _read_csv_file(path: Path, sep: str, longest_line: int = 0) -> RawTable:
    """pyarrow's streaming CSV reader (memory: the table plus a block), every column as text, bad
    records collected with their numbers. A block must hold a whole record: it starts at twice
    the longest line and grows (a quoted value may span lines) up to 4 x MAX_LINE_BYTES; a file
    whose records do not fit, or whose header repeats a name, raises UnreadableSource."""
    if longest_line > MAX_LINE_BYTES:
        raise UnreadableSource("line_too_long", f"{path.name}: a line of {longest_line} bytes "
                               f"(at most {MAX_LINE_BYTES} are read)")
    block = 1 << max(20, int(2 * longest_line + 1).bit_length())
    parse = pacsv.ParseOptions(delimiter=sep, newlines_in_values=True, invalid_row_handler=lambda r: "skip")
    while True:
        try:
            names = pacsv.open_csv(str(path), read_options=pacsv.ReadOptions(block_size=block),
                                   parse_options=parse).schema.names
            break
        except pa.ArrowInvalid as err:
            if block >= 4 * MAX_LINE_BYTES:
                raise UnreadableSource("unreadable_file", f"{path.name}: not readable as CSV ({err})") from err
            block *= 4
    if len(names) > MAX_COLUMNS:
        raise UnreadableSource("too_many_columns", f"{path.name}: {len(names)} columns (at most {MAX_COLUMNS})")
    if len(set(names)) < len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UnreadableSource("duplicate_columns", f"{path.name}: the header repeats {dup}")
    bad: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(row)
        return "skip"

    def read(threads: bool) -> pa.Table:
        nonlocal block
        while True:
            bad.clear()
            try:
                return read_blocks(threads)
            except pa.ArrowInvalid as err:  # a record straddling blocks, or not CSV at all
                if block >= 4 * MAX_LINE_BYTES:
                    raise UnreadableSource("unreadable_file", f"{path.name}: not readable as CSV ({err})") from err
                block *= 4

    def read_blocks(threads: bool) -> pa.Table:
        return pacsv.open_csv(
            str(path),
            read_options=pacsv.ReadOptions(use_threads=threads, block_size=block),
            parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 null_values=[""], strings_can_be_null=True),
        ).read_all()

    table = read(True)
    if any(r.number is None for r in bad):  # row numbers are only known when read in one thread
        table = read(False)
    bad_numbers = {int(r.number) for r in bad if r.number is not None}
    candidates = np.arange(2, table.num_rows + len(bad) + 2)
    rows = candidates[~np.isin(candidates, list(bad_numbers))] if bad_numbers else candidates
    errors = [(int(r.number or 0), "malformed_csv_row", json.dumps(_cut(r.text))) for r in bad]
    return RawTable(table.to_pandas(), str(path), rows[: table.num_rows], errors)


def read_parquet(path: str | Path, max_bytes: int | None = None) -> RawTable:
    """A Parquet file, read a batch of rows at a time while counting their in-memory size.

    A column whose type nests deeper than MAX_NESTING is not read; every row gets
    ``too_deeply_nested:<column>``. Raises UnreadableSource: ``unreadable_file`` (not Parquet,
    truncated, a corrupt page), ``duplicate_columns``, ``too_deeply_nested`` (every column is) or
    ``too_large_decompressed`` (the rows take more than ``max_bytes``, default
    :data:`MAX_DECOMPRESSED_BYTES`, in memory: stopped as soon as the batches read pass it).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    limit = MAX_DECOMPRESSED_BYTES if max_bytes is None else max_bytes
    try:
        with pq.ParquetFile(path) as pf:
            schema = pf.schema_arrow
            if len(schema.names) > MAX_COLUMNS:
                raise UnreadableSource("too_many_columns", f"{path.name}: {len(schema.names)} columns "
                                       f"(at most {MAX_COLUMNS})")
            if len(set(schema.names)) < len(schema.names):
                raise UnreadableSource("duplicate_columns", f"{path.name}: repeated column names")
            deep = [f.name for f in schema if type_depth(f.type) > MAX_NESTING]
            if deep and len(deep) == len(schema):
                raise UnreadableSource("too_deeply_nested", f"{path.name}: every column nests deeper than {MAX_NESTING}")
            schema = pa.schema([f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f
                                for f in schema if f.name not in deep], metadata=schema.metadata)
            batches, size = [], 0
            for batch in pf.iter_batches(batch_size=1 << 16, columns=schema.names if deep else None):
                # dictionary columns decoded here: their in-memory size is what validation will hold
                batch = pa.RecordBatch.from_arrays(
                    [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in batch.columns],
                    schema=schema)
                size += batch.nbytes
                if size > limit:
                    raise UnreadableSource("too_large_decompressed", f"{path.name}: its rows take more than "
                                           f"{limit} bytes in memory (a {path.stat().st_size}-byte file)")
                batches.append(batch)
        frame = pa.Table.from_batches(batches, schema).to_pandas()
    except UnreadableSource:
        raise
    except (pa.ArrowException, OSError, ValueError, TypeError, KeyError) as err:
        raise UnreadableSource("unreadable_file", f"{path.name}: not a readable Parquet file ({err})") from err
    if len(set(map(str, frame.columns))) < frame.shape[1]:
        raise UnreadableSource("duplicate_columns", f"{path.name}: repeated column names")
    return _without_deep(RawTable(frame.reset_index(drop=True), str(path), np.arange(1, len(frame) + 1)), deep)


def _without_deep(table: RawTable, deep: list[str]) -> RawTable:
    """Every row of a table read without its too-deep columns gets a reason per such column."""
    if deep:
        reasons = [f"too_deeply_nested:{c}" for c in deep]
        table.row_reasons = {pos: list(reasons) for pos in range(len(table.frame))}
        table.notes.append(f"columns nested deeper than {MAX_NESTING}, not read: {', '.join(deep)}")
    return table


def _dataset_table(ds, split: str, name: str) -> RawTable:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise ValueError(f"{name}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    if len(ds.data.schema) > MAX_COLUMNS:
        raise UnreadableSource("too_many_columns", f"{name}: {len(ds.data.schema)} columns (at most {MAX_COLUMNS})")
    deep = [f.name for f in ds.data.schema if type_depth(f.type) > MAX_NESTING]
    if deep and len(deep) == len(ds.data.schema):
        raise UnreadableSource("too_deeply_nested", f"{name}: every column nests deeper than {MAX_NESTING}")
    frame = (ds.remove_columns(deep) if deep else ds).to_pandas()
    return _without_deep(RawTable(frame, name, np.arange(1, len(frame) + 1)), deep)


def read_saved_dataset(path: str | Path, split: str = "train", max_bytes: int | None = None) -> RawTable:
    """A ``datasets`` Dataset or DatasetDict saved with ``save_to_disk`` (DatasetDict: ``split``).

    Its Arrow files may be compressed, and ``load_from_disk`` decompresses them whole: they are
    first streamed a record batch at a time (memory-mapped; a compressed batch is decompressed
    and dropped) and refused as ``too_large_decompressed`` past ``max_bytes`` (default
    :data:`MAX_DECOMPRESSED_BYTES`)."""
    import datasets

    path = Path(path)
    folder = path / split if (path / "dataset_dict.json").exists() and (path / split).is_dir() else path
    _check_arrow_size(folder, MAX_DECOMPRESSED_BYTES if max_bytes is None else max_bytes)
    return _dataset_table(datasets.load_from_disk(str(path)), split, str(path))


def _check_arrow_size(folder: Path, limit: int) -> None:
    import pyarrow.ipc as ipc

    size = 0
    for file in sorted(folder.glob("*.arrow")):
        try:
            with pa.memory_map(str(file)) as source:
                for batch in ipc.open_stream(source):
                    size += batch.nbytes
                    if size > limit:
                        raise UnreadableSource("too_large_decompressed", f"{folder.name}: its rows take more than "
                                               f"{limit} bytes in memory")
        except pa.ArrowException as err:
            raise UnreadableSource("unreadable_file", f"{file.name}: not a readable Arrow stream ({err})") from err


def read_hub(name: str, split: str = "train", config_name: str | None = None, revision: str | None = None) -> RawTable:
    """A hub dataset through ``datasets.load_dataset`` (needs network access to the hub)."""
    import datasets

    ds = datasets.load_dataset(name, config_name, split=split, revision=revision)
    return _dataset_table(ds, split, name)


def read_source(path: str | Path, fmt: str = "auto", *, split: str = "train", config_name: str | None = None,
                revision: str | None = None, digest: str | None = None, scan: TextScan | None = None) -> RawTable:
    """Read one source of a known or detected format (see :func:`detect_format`).

    The content digest of local files and folders is filled in (pass ``digest`` when it is
    already known, to skip hashing the file again; ``scan``: a JSONL or CSV file's text scan,
    to skip scanning it again). Raises FileNotFoundError, ValueError.
    """
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "hub":
        return read_hub(str(path), split, config_name, revision)
    if not Path(path).exists():
        raise FileNotFoundError(f"feedback source not found: {path}")
    if fmt in ("jsonl", "csv", "parquet") and not Path(path).is_file():  # a FIFO or device would block or never end
        raise UnreadableSource("not_a_regular_file", f"{path}: not a regular file")
    readers = {"jsonl": lambda p: read_jsonl(p, digest=digest, scan=scan),
               "csv": lambda p: read_csv(p, digest=digest, scan=scan),
               "parquet": read_parquet,
               "dataset": lambda p: read_saved_dataset(p, split)}
    if fmt not in readers:
        raise ValueError(f"{path}: unknown format {fmt!r}")
    table = readers[fmt](path)
    table.digest = digest or table.digest or content_digest(path)
    return table
