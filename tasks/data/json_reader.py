"""JSON lines and JSON array documents into raw tables (:class:`~tasks.data.raw.RawTable`).

A line that does not parse or is not an object becomes a read error with its line number
(``malformed_json``, ``not_an_object``), so validation quarantines it while the rest of the file
goes on; bytes that are not UTF-8 decode to U+FFFD (``invalid_utf8:<field>`` in validation).
Hostile input is bounded: a line longer than :data:`~tasks.data.scan.MAX_LINE_BYTES` is a
``line_too_long`` read error, never held whole; a row nesting arrays/objects deeper than
:data:`~tasks.data.scan.MAX_NESTING` is a ``too_deeply_nested`` read error and never reaches
Arrow's JSON reader, which recurses on the C stack (near 10,000 levels it kills the process); a
row bringing the file past :data:`~tasks.data.scan.MAX_COLUMNS` distinct fields is
``too_many_fields``.
"""

from __future__ import annotations

import codecs
import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson

from tasks.data.raw import RAW_MAX_CHARS, RawTable, UnreadableSource, cut_raw, type_depth
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
)

try:  # orjson (a Prefect dependency) parses the slow path about twice as fast; json is the fallback
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - exercised only without orjson
    _loads = json.loads

MAX_JSON_ARRAY_BYTES = 1 << 30
"""Largest ``.json`` array document (it is parsed whole); JSON lines have no such limit."""

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
    return json.dumps(cut_raw(line.decode("utf-8", errors="replace")))


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


def _raw_json_value(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= RAW_MAX_CHARS else json.dumps(cut_raw(text))


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
