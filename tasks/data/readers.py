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
``line_too_long`` read error, never held whole; a value nested deeper than
:data:`~tasks.data.scan.MAX_NESTING` is never parsed. This module holds the dispatch
(:func:`read_source`), the landing folder's listing and digests, and the CSV, Parquet,
``datasets`` and hub readers; JSON lines and arrays are :mod:`tasks.data.json_reader`'s, and
what every reader returns (:class:`~tasks.data.raw.RawTable`) is :mod:`tasks.data.raw`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from tasks.data.json_reader import read_jsonl
from tasks.data.raw import RawTable, UnreadableSource, cut_raw, type_depth
from tasks.data.scan import (
    MAX_COLUMNS,
    MAX_LINE_BYTES,
    MAX_NESTING,
    TextScan,
    scan_text,
    write_repaired,
)

log = logging.getLogger(__name__)

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "csv",
                ".parquet": "parquet", ".pq": "parquet"}
DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
MAX_DECOMPRESSED_BYTES = 1 << 31
"""Largest in-memory size (Arrow bytes) of one Parquet file's rows: a small file that expands
past it (a compression or dictionary bomb) is refused as ``too_large_decompressed``."""

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
    errors = [(int(r.number or 0), "malformed_csv_row", json.dumps(cut_raw(r.text))) for r in bad]
    return RawTable(table.to_pandas(), str(path), rows[: table.num_rows], errors)


def read_parquet(path: str | Path, max_bytes: int | None = None) -> RawTable:
    """A Parquet file, read a batch of rows at a time while counting their in-memory size.

    A column whose type nests deeper than MAX_NESTING is not read; every row gets
    ``too_deeply_nested:<column>`` (when every column does, the rows are counted from the file's
    metadata and each is quarantined so). Raises UnreadableSource: ``unreadable_file`` (not Parquet,
    truncated, a corrupt page), ``duplicate_columns``, ``too_deeply_nested`` (every column is, in
    more rows than the memory limit can list) or
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
            if deep and len(deep) == len(schema):  # nothing to read, but the rows are counted and quarantined
                rows = pf.metadata.num_rows
                if rows * len(deep) * 64 > limit:  # their reasons alone would pass the memory limit
                    raise UnreadableSource("too_deeply_nested", f"{path.name}: every column nests deeper than "
                                           f"{MAX_NESTING}, in {rows} rows")
                return _without_deep(RawTable(pd.DataFrame(index=range(rows)), str(path), np.arange(1, rows + 1)),
                                     deep)
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
