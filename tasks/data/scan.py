"""One streaming pass over a text export: content digest, line count, blank lines, invalid UTF-8.

The file is read in blocks cut at line ends (a newline byte never occurs inside a multi-byte
UTF-8 sequence), so memory stays at one block whatever the file size. Decoding a block that
holds invalid UTF-8 notes where each bad sequence starts, which gives the lines to repair.
"""

from __future__ import annotations

import codecs
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 1 << 24
MAX_LINE_BYTES = 1 << 24
"""Longest line a reader parses (16 MiB); a longer line is quarantined as ``line_too_long``
without being held in memory (a row's texts are capped at ``data.max_text_chars`` anyway)."""
MAX_NESTING = 64
"""Deepest nesting of arrays and objects in a row; deeper rows are quarantined as
``too_deeply_nested`` (parsers and the code after them recurse once per level)."""
MAX_COLUMNS = 1000
"""Most fields a row (and a file) may have; a JSON row with more is quarantined as
``too_many_fields``, a CSV/Parquet file with more columns as ``too_many_columns`` (Arrow's JSON
type inference takes time quadratic in the number of distinct keys: 20,000 took 64 s)."""
_positions: list[int] = []


def _note(err: UnicodeDecodeError) -> tuple[str, int]:
    _positions.append((err.start, err.end))
    return "\ufffd", err.end


codecs.register_error("alignflow_note_position", _note)


@dataclass
class TextScan:
    """What one pass over a file found."""

    digest: str
    """sha256 of the bytes."""
    lines: int
    """Lines, counting a last line without a newline when it is not blank."""
    blank_lines: bool
    """An empty line (or an empty first line) occurs; whitespace-only lines are not detected."""
    bad_lines: np.ndarray
    """0-based indexes of lines holding invalid UTF-8, ascending."""
    bad_spans: np.ndarray
    """(start, end) byte offsets of those lines (end exclusive, newline excluded), shape (n, 2)."""
    bad_bytes: np.ndarray
    """(start, end) byte offsets of every invalid UTF-8 sequence, shape (m, 2)."""
    bom: bool
    """The file starts with a UTF-8 byte-order mark."""
    longest_line: int = 0
    """Bytes in the longest line (a parser's block must hold a whole line)."""
    non_object_lines: bool = False
    """A line does not start with ``{`` (a blank line, leading whitespace, an array, ``null``):
    such files are parsed line by line (pyarrow 25's JSON reader crashes the process on a
    first line ``null``, and reads a ``null`` line as a row of nulls)."""
    deep_lines: int = 0
    """Lines of at least :data:`DEEP_CHECK_BYTES` bytes holding that many ``[``/``{`` or more
    (they may nest deeper than Arrow's JSON reader survives: it recurses on the C stack and
    crashes the process near 10,000 levels), or more than MAX_COLUMNS ``:`` (keys): such files
    are parsed line by line, where each row is bounded on its own."""


def _lines_of(piece: bytes) -> np.ndarray:
    """Newline positions of a piece."""
    return np.flatnonzero(np.frombuffer(piece, np.uint8) == 10)


DEEP_CHECK_BYTES = 4096
"""A line shorter than this cannot nest this deep (each level takes a byte), so only longer lines
have their brackets counted; Arrow's JSON reader and ``to_pandas`` were tried safe to 4096 levels."""


def _suspect(piece: bytes | memoryview) -> bool:
    """A long line that may nest too deep or hold too many keys for Arrow's reader."""
    data = bytes(piece)
    return data.count(b"[") + data.count(b"{") >= DEEP_CHECK_BYTES or data.count(b":") > MAX_COLUMNS


def _depth_profile(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bytes, nesting depth after each byte, whether each byte is inside a string) of JSON text.
    A quote is escaped when an odd run of backslashes precedes it; a quote counts as inside."""
    a = np.frombuffer(data, np.uint8)
    quotes = np.flatnonzero(a == 34)
    if len(quotes):
        backslash = a == 92
        if backslash.any():
            last_other = np.maximum.accumulate(np.where(backslash, -1, np.arange(len(a))))  # last non-backslash
            before = np.maximum(quotes - 1, 0)
            run = np.where(quotes > 0, before - last_other[before], 0)
            quotes = quotes[run % 2 == 0]
    step = np.zeros(len(a) + 1, np.int8)
    step[quotes] = 1
    inside = np.cumsum(step[:-1], dtype=np.int64) % 2 == 1
    delta = ((a == 91) | (a == 123)).astype(np.int32) - ((a == 93) | (a == 125))
    delta[inside] = 0
    return a, np.cumsum(delta), inside


def json_depth(data: bytes) -> int:
    """Deepest ``[``/``{`` nesting of JSON text, brackets inside strings not counted (vectorised).
    On broken JSON it may count too deep, never too shallow up to where a parser would stop."""
    if not data:
        return 0
    return int(max(_depth_profile(data)[1].max(), 0))


def split_json_array(data: bytes) -> list[bytes] | None:
    """The element texts of a JSON array document, cut at its top-level commas without parsing
    (so one element nested too deep for a parser can be refused alone); None when the text is
    not one array."""
    if not data.strip():
        return None
    a, depth, inside = _depth_profile(data)
    opened = np.flatnonzero(depth >= 1)
    if not len(opened) or a[opened[0]] != 91:
        return None
    start = int(opened[0])
    ends = np.flatnonzero((depth == 0) & (np.arange(len(a)) > start))
    end = int(ends[0]) if len(ends) else len(a)
    commas = np.flatnonzero((a == 44) & (depth == 1) & ~inside)
    commas = commas[(commas > start) & (commas < end)]
    bounds = [start, *commas.tolist(), end]
    parts = [data[x + 1: y] for x, y in zip(bounds[:-1], bounds[1:], strict=True)]
    return [] if len(parts) == 1 and not parts[0].strip() else parts


def nests_deeper(data: bytes, limit: int = MAX_NESTING) -> bool:
    """JSON text nesting deeper than ``limit`` (brackets counted first: cheap for most rows)."""
    return data.count(b"[") + data.count(b"{") > limit and json_depth(data) > limit


DECODE_WINDOW = 1 << 20
"""Bytes decoded at once when checking UTF-8 (bounds the temporary text)."""


def _invalid_utf8(piece: bytes | memoryview, newlines: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(line indexes, invalid byte spans) of a piece's lines that are not valid UTF-8.

    The piece is decoded a window of whole lines at a time; at each failure the failing line
    is decoded once more with a handler that notes where each bad sequence starts and ends, and
    decoding resumes after that line (a newline byte never occurs inside a UTF-8 sequence).
    """
    bounds = np.concatenate([[-1], newlines, [len(piece)]])
    lines, spans = [], []
    pos = 0
    while pos < len(piece):
        stop = min(pos + DECODE_WINDOW, len(piece))
        if stop < len(piece):  # end the window at a line end (or take the whole long line)
            i = np.searchsorted(newlines, stop, side="left")
            stop = int(newlines[i]) + 1 if i < len(newlines) else len(piece)
        try:
            codecs.utf_8_decode(piece[pos:stop], "strict", True)
            pos = stop
            continue
        except UnicodeDecodeError as err:
            line = int(np.searchsorted(newlines, pos + err.start, side="left"))
        a, b = int(bounds[line]) + 1, int(bounds[line + 1])
        _positions.clear()
        codecs.utf_8_decode(piece[a:b], "alignflow_note_position", True)
        lines.append(line)
        spans.extend((a + s, a + e) for s, e in _positions)
        pos = b + 1
    return np.array(lines, np.int64), np.array(spans, np.int64).reshape(-1, 2)


def scan_text(path: str | Path, block: int = BLOCK, digest: str | None = None) -> TextScan:
    """Scan ``path`` (see the module docstring); a known ``digest`` skips hashing.

    Blocks are not copied: the lines of a block are scanned in place, and only a line cut by a
    block boundary is joined into a small piece of its own. The sha256 runs in a helper thread,
    a block behind the scan (hashlib releases the GIL), so hashing and scanning overlap.
    """
    h = hashlib.sha256()
    base, offset, blank, bom, longest, deep, odd = 0, 0, False, None, 0, 0, False
    bad_lines, bad_spans, bad_bytes = [], [], []

    def take(piece: bytes | memoryview, ascii_only: bool) -> None:
        nonlocal base, offset, blank, longest, deep, odd
        newlines = _lines_of(piece)
        if not odd and len(piece):  # the first byte of every line
            starts = np.concatenate([[0], newlines + 1])
            odd = bool((np.frombuffer(piece, np.uint8)[starts[starts < len(piece)]] != 123).any())
        tail = len(piece) - (int(newlines[-1]) + 1 if len(newlines) else 0)
        longest = max(longest, tail)
        if tail >= DEEP_CHECK_BYTES:
            deep += _suspect(piece[len(piece) - tail:])
        if len(newlines):  # an empty line: two newlines in a row, maybe with a CR between
            gaps = np.diff(newlines, prepend=-1)
            longest = max(longest, int(gaps.max()))
            for i in np.flatnonzero(gaps > DEEP_CHECK_BYTES).tolist():  # few lines are this long
                end = int(newlines[i])
                deep += _suspect(piece[end - int(gaps[i]) + 1: end])
            blank = blank or bool((gaps == 1).any()) or bool(
                ((gaps == 2) & (np.frombuffer(piece, np.uint8)[np.maximum(newlines - 1, 0)] == 13)).any())
        if not ascii_only:
            lines, spans = _invalid_utf8(piece, newlines)
            if len(lines):
                bounds = np.concatenate([[-1], newlines, [len(piece)]])
                bad_lines.append(base + lines)
                bad_spans.append(np.stack([bounds[lines] + 1, bounds[lines + 1]], axis=1) + offset)
                bad_bytes.append(spans + offset)
        base += len(newlines)
        offset += len(piece)

    def take_carry(piece: bytes) -> None:
        """A line that spanned blocks; past ``MAX_LINE_BYTES`` only its length was kept (the
        readers quarantine such a line unread), so offsets move on by the dropped bytes."""
        nonlocal dropped, offset, longest
        take(piece, piece.isascii())
        if dropped:
            longest, offset, dropped = max(longest, len(piece) + dropped), offset + dropped, 0

    dropped = 0
    with open(path, "rb") as f, ThreadPoolExecutor(max_workers=1) as hasher:
        carry, hashing = b"", None
        while chunk := f.read(block):
            if digest is None:
                if hashing is not None:
                    hashing.result()  # at most one block waiting: memory stays at two blocks
                hashing = hasher.submit(h.update, chunk)
            if bom is None:
                bom = chunk.startswith(codecs.BOM_UTF8)
            first = chunk.find(b"\n")
            if first < 0:
                if len(carry) < MAX_LINE_BYTES:
                    carry += chunk
                else:  # a giant line: memory stays bounded
                    dropped += len(chunk)
                continue
            last, view, ascii_only = chunk.rfind(b"\n"), memoryview(chunk), chunk.isascii()
            if carry:
                take_carry(carry + chunk[: first + 1])
            else:
                take(view[: first + 1], ascii_only)
            if last > first:
                take(view[first + 1: last + 1], ascii_only)
            carry = chunk[last + 1:]
        if hashing is not None:
            hashing.result()
    lines = base
    if carry.strip() or dropped:
        take_carry(carry)
        lines += 1

    def cat(parts, width):
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, width) if width else 0, np.int64)

    return TextScan(digest or h.hexdigest(), lines, blank, cat(bad_lines, 0), cat(bad_spans, 2), cat(bad_bytes, 2),
                    bool(bom), longest, odd, deep)


class PatchedFile(io.RawIOBase):
    """A read-only view of a file in which the given byte spans read as '?' (same length), so a
    parser that needs valid UTF-8 can read it in place; the original lines are re-read separately."""

    def __init__(self, path: str | Path, spans: np.ndarray) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._spans = spans
        self._size = Path(path).stat().st_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def size(self) -> int:
        return self._size

    def readinto(self, buffer) -> int:
        start = self._f.tell()
        n = self._f.readinto(buffer)
        if n:
            view = memoryview(buffer).cast("B")
            lo = np.searchsorted(self._spans[:, 1], start, side="right")
            hi = np.searchsorted(self._spans[:, 0], start + n, side="left")
            for s, e in self._spans[lo:hi]:
                a, b = max(s - start, 0), min(e - start, n)
                view[a:b] = b"?" * (b - a)
        return n

    def read_buffer(self, size: int = -1):
        """A block as an Arrow buffer from Arrow's memory pool (pyarrow's file wrapper prefers this
        to ``read``: no Python bytes object per block, and the pool reuses the blocks' memory)."""
        import pyarrow as pa

        if size is None or size < 0:
            size = max(self._size - self._f.tell(), 0)
        buffer = pa.allocate_buffer(size, resizable=True)
        n = self.readinto(memoryview(buffer))
        if n < size:
            buffer.resize(n)
        return buffer

    def close(self) -> None:
        self._f.close()
        super().close()


def read_spans(path: str | Path, spans: np.ndarray) -> list[bytes]:
    """The bytes of each (start, end) span of a file."""
    out = []
    with open(path, "rb") as f:
        for s, e in spans:
            f.seek(int(s))
            out.append(f.read(int(e - s)))
    return out


def write_repaired(path: str | Path, dest: io.RawIOBase, block: int = BLOCK) -> None:
    """Copy a file to ``dest`` as valid UTF-8: a leading byte-order mark is dropped and invalid
    sequences become U+FFFD, block by block (blocks cut at line ends), so memory stays small."""
    carry, first = b"", True
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            if first and chunk.startswith(codecs.BOM_UTF8):
                chunk = chunk[len(codecs.BOM_UTF8):]
            first = False
            data = carry + chunk if carry else chunk
            cut = data.rfind(b"\n") + 1 if chunk else len(data)
            piece, carry = data[:cut], data[cut:]
            dest.write(piece.decode("utf-8", "replace").encode("utf-8"))
            if not chunk:
                break
