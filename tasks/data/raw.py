"""What a reader returns: the raw table of one source (rows as read, before any typing, with the
rows it could not read), the error for a source that cannot be read at all, and the limits every
reader shares. :mod:`tasks.data.readers` reads CSV, Parquet, ``datasets`` folders and hub ids,
:mod:`tasks.data.json_reader` JSON lines and JSON arrays; both return a :class:`RawTable`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.data.coerce import to_json

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


def cut_raw(text: str, limit: int = RAW_MAX_CHARS) -> str:
    """``text``, or its first ``limit`` characters marked as cut: raw rows kept for quarantine."""
    return text if len(text) <= limit else text[:limit] + f"... [cut: {len(text)} characters]"
