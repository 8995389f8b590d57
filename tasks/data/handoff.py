"""The validated hand-off files between ingest and the preference builder: Arrow IPC files.

Ingest writes each batch's valid rows per kind to ``validated/<kind>/<batch>.arrow``, an
uncompressed Arrow IPC file (the "Feather v2" format: pandas ``read_feather``, polars and
DuckDB read it). The builder memory-maps it, so its columns are the file's pages, shared with
the page cache, instead of a decoded copy: at 1M feedback rows Parquet decoding allocated
940 MiB to read the two response columns (290 MiB of text), the mapped file 395 MiB, and
reading took 0.2-0.35 s instead of 3 ms (``benchmarks/ingest_throughput.py``). The file is an
internal hand-off read back once, so size and compression matter less than that.

Stores written before (``<batch>.parquet``) are still read. A file is written under a temporary
name and renamed into place, so a process that has an earlier version mapped keeps it intact.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SUFFIXES = (".arrow", ".parquet")
"""Validated file name endings, the current one first."""


def write_validated(path: str | Path, schema: pa.Schema, parts: Iterable[pa.Table]) -> None:
    """Write ``parts`` (tables of ``schema``) as one IPC file at ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for part in parts:
                writer.write_table(part)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def open_validated(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A validated file as a table: IPC files memory-mapped (no copy), Parquet read."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=columns, pre_buffer=False)
    with pa.memory_map(str(path)) as source:  # the arrays keep the mapping alive after close
        table = pa.ipc.open_file(source).read_all()
    return table.select(columns) if columns is not None else table


def validated_rows(path: str | Path) -> int:
    """Row count of a validated file (from its footer; nothing is read)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def read_validated_frame(path: str | Path) -> pd.DataFrame:
    """A validated file as a pandas frame (copied out of the mapping)."""
    return open_validated(path).to_pandas()
