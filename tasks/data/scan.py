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


def _lines_of(piece: bytes) -> np.ndarray:
    """Newline positions of a piece."""
    return np.flatnonzero(np.frombuffer(piece, np.uint8) == 10)


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
    base, offset, blank, bom, longest = 0, 0, False, None, 0
    bad_lines, bad_spans, bad_bytes = [], [], []

    def take(piece: bytes | memoryview, ascii_only: bool) -> None:
        nonlocal base, offset, blank, longest
        newlines = _lines_of(piece)
        longest = max(longest, len(piece) - (int(newlines[-1]) + 1 if len(newlines) else 0))
        if len(newlines):  # an empty line: two newlines in a row, maybe with a CR between
            gaps = np.diff(newlines, prepend=-1)
            longest = max(longest, int(gaps.max()))
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
                carry += chunk
                continue
            last, view, ascii_only = chunk.rfind(b"\n"), memoryview(chunk), chunk.isascii()
            if carry:
                joined = carry + chunk[: first + 1]
                take(joined, joined.isascii())
            else:
                take(view[: first + 1], ascii_only)
            if last > first:
                take(view[first + 1: last + 1], ascii_only)
            carry = chunk[last + 1:]
        if hashing is not None:
            hashing.result()
    lines = base
    if carry.strip():
        take(carry, carry.isascii())
        lines += 1

    def cat(parts, width):
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, width) if width else 0, np.int64)

    return TextScan(digest or h.hexdigest(), lines, blank, cat(bad_lines, 0), cat(bad_spans, 2), cat(bad_bytes, 2),
                    bool(bom), longest)


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
