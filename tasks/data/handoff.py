"""The validated hand-off files between ingest and the preference builder: Arrow IPC files.

This module owns their layout: where one is written (:func:`validated_path`), which exist
(:func:`validated_files`), which batches a build reads (:func:`selected_files`), and how one is
written and read. Nothing else builds these paths.

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
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.data.settings import KINDS

SUFFIXES = (".arrow", ".parquet")
"""Validated file name endings, the current one first."""


def validated_root(out_dir: str | Path) -> Path:
    """The validated store under an ingest's output folder."""
    return Path(out_dir) / "validated"


def validated_path(out_dir: str | Path, kind: str, batch: str) -> Path:
    """Where ingest writes one batch's valid rows of one kind (under ``out_dir``)."""
    return validated_root(out_dir) / kind / f"{batch}{SUFFIXES[0]}"


def drop_older_formats(path: str | Path) -> None:
    """Remove the same batch as an older version wrote it (``.parquet``), once ``path`` is written."""
    for suffix in SUFFIXES[1:]:
        Path(path).with_suffix(suffix).unlink(missing_ok=True)


def batch_files(out_dir: str | Path, batch: str) -> list[Path]:
    """Every validated file of one ingest batch (any kind, any format), e.g. to remove it."""
    root = validated_root(out_dir)
    return sorted(p for suffix in SUFFIXES for p in root.glob(f"*/{batch}{suffix}"))


def batch_of(path: str | Path) -> str:
    """The ingest batch id of a validated file (its name)."""
    return Path(path).stem


def validated_files(validated: str | Path | Mapping[str, list]) -> dict[str, list[Path]]:
    """Validated files per kind: a validated store (``<kind>/*.arrow``, or ``*.parquet`` from
    older stores; a missing folder holds none), or a mapping kind -> paths."""
    if isinstance(validated, Mapping):
        return {k: sorted(Path(p) for p in v) for k, v in validated.items() if k in KINDS and v}
    root = Path(validated)
    out = {k: sorted(p for suffix in SUFFIXES for p in (root / k).glob(f"*{suffix}")) for k in KINDS}
    return {k: v for k, v in out.items() if v}


def selected_files(root: str | Path, recent_batches: int | None,
                   also: Iterable[str] = ()) -> dict[str, list[Path]]:
    """Validated files per kind, limited to the newest ``recent_batches`` ingest batches plus the
    batches named in ``also`` (ids; one no longer in the store is skipped).

    A batch is one ingest (its files share the batch id as their name); batches are ordered by
    when they were written (the newest file's mtime, then the id), so a re-ingested batch
    counts as new."""
    files = validated_files(root)
    if recent_batches is None:
        return files
    written: dict[str, float] = {}
    for paths in files.values():
        for p in paths:
            written[batch_of(p)] = max(written.get(batch_of(p), 0.0), p.stat().st_mtime)
    keep = set(sorted(written, key=lambda b: (written[b], b))[-recent_batches:]) | set(also)
    return {k: [p for p in v if batch_of(p) in keep] for k, v in files.items()
            if any(batch_of(p) in keep for p in v)}


def read_validated_kind(root: str | Path, kind: str) -> pd.DataFrame | None:
    """Every validated batch of one kind as one frame; None when the store has none."""
    paths = validated_files(root).get(kind, [])
    if not paths:
        return None
    return pd.concat([read_validated_frame(p) for p in paths], ignore_index=True)


def write_validated(path: str | Path, schema: pa.Schema, parts: Iterable[pa.Table]) -> None:
    """Write ``parts`` (tables of ``schema``) as one IPC file at ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")  # unique: never shared by two writers
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


def head_frame(path: str | Path, rows: int = 100) -> pd.DataFrame:
    """The first ``rows`` rows of a Parquet or validated (Arrow IPC) file as pandas, reading no
    more of the file than they take (lineage records need the columns, not the data)."""
    path = Path(path)
    if path.suffix == ".parquet":
        first = next(pq.ParquetFile(path).iter_batches(batch_size=rows), None)
        return (first if first is not None else pq.read_schema(path).empty_table()).to_pandas()
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)
        table = reader.get_batch(0).slice(0, rows) if reader.num_record_batches else reader.schema.empty_table()
        return table.to_pandas()


def read_validated_frame(path: str | Path) -> pd.DataFrame:
    """A validated file as a pandas frame (copied out of the mapping)."""
    return open_validated(path).to_pandas()
