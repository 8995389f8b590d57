"""Text keys and stable hashes: whitespace normalisation, vocabularies, pair ids, splits, digests.

Hashes are blake2b (8 bytes) of UTF-8 text, combined with a fixed 64-bit mixer, so they are the
same on every machine, Python and library version. Normalisation collapses every run of
Unicode whitespace to one space and trims the ends; chat prompts are keyed by their messages
with normalised contents (prefixed with U+0001, which no valid plain prompt contains).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

CHAT_KEY_PREFIX = "\x01"
_M1, _M2, _GOLDEN = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(0x9E3779B97F4A7C15)


def _as_array(values) -> pa.Array | pa.ChunkedArray:
    """Large-string Arrow data (chunked arrays stay chunked; the cast shares the text buffer)."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=pa.large_string())
    return arr if arr.type == pa.large_string() else arr.cast(pa.large_string())


def _combined(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


SCAN_WINDOW = 1 << 18
"""Bytes a byte test sees at once: a few vectorised passes over a window that stays in the CPU
cache cost much less than the same passes over a whole column."""


def rows_with_bytes(arr, test, edges: bool = False, window: int = SCAN_WINDOW) -> np.ndarray:
    """Rows of a string array whose UTF-8 bytes hold a match of ``test`` (uint8 array -> match
    positions, or a boolean array of the same length); with ``edges``, rows that start or end
    with a space match too.

    Each chunk's bytes are scanned as one run, ``window`` bytes at a time; a window also shows
    the test the next two bytes (for matches of up to three bytes), and a match found in those
    belongs to the next window, so the hits are those of a test over the whole run.
    """
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    out = []
    for chunk in chunks:
        width = np.int64 if chunk.type == pa.large_string() else np.int32
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, width)[chunk.offset: chunk.offset + len(chunk) + 1].astype(np.int64)
        mask = np.zeros(len(chunk), bool)
        if data_buf is not None and len(chunk) and offsets[-1] > offsets[0]:
            data = np.frombuffer(data_buf, np.uint8)
            run = data[offsets[0]:offsets[-1]]
            hits = []
            for start in range(0, len(run), window):
                found = test(run[start:start + window + 2])
                found = np.flatnonzero(found) if found.dtype == bool else found
                found = found[found < window]
                if len(found):
                    hits.append(found + start)
            if hits:
                mask[np.searchsorted(offsets, np.concatenate(hits) + offsets[0], side="right") - 1] = True
            if edges:
                start, end = offsets[:-1], offsets[1:]
                full = end > start
                mask[full] |= (data[start[full]] == 32) | (data[end[full] - 1] == 32)
        out.append(mask)
    return np.concatenate(out) if out else np.zeros(0, bool)


def _odd_whitespace(data: np.ndarray) -> np.ndarray:
    """Positions of bytes that start whitespace a normalised text would not hold: ASCII
    whitespace other than a single space (\t \n \v \f \r), a second space in a row, and the
    Unicode spaces (U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000)."""
    ascii_ws = np.flatnonzero((data >= 9) & (data <= 13))
    space = data == 32
    double = np.flatnonzero(space[:-1] & space[1:])
    lead = np.flatnonzero((data == 0xC2) | ((data >= 0xE1) & (data <= 0xE3)))
    if not len(lead):
        return np.concatenate([ascii_ws, double])
    padded = np.concatenate([data, np.zeros(2, np.uint8)])
    b0, b1, b2 = padded[lead], padded[lead + 1], padded[lead + 2]
    unicode_space = (
        ((b0 == 0xC2) & ((b1 == 0x85) | (b1 == 0xA0)))
        | ((b0 == 0xE1) & (b1 == 0x9A) & (b2 == 0x80))
        | ((b0 == 0xE2) & (b1 == 0x80) & (((b2 >= 0x80) & (b2 <= 0x8A)) | (b2 == 0xA8) | (b2 == 0xA9) | (b2 == 0xAF)))
        | ((b0 == 0xE2) & (b1 == 0x81) & (b2 == 0x9F))
        | ((b0 == 0xE3) & (b1 == 0x80) & (b2 == 0x80))
    )
    return np.concatenate([ascii_ws, double, lead[unicode_space]])


def normalize_ws(values) -> pa.Array | pa.ChunkedArray:
    """Whitespace-normalised text (nulls stay null). Only values that need it are rewritten; a
    byte scan finds them (as ``" ".join(text.split())`` would change them, for printable text)."""
    arr = _as_array(values)
    needs = rows_with_bytes(arr, _odd_whitespace, edges=True)
    if not needs.any():
        return arr
    needs = pa.array(needs)
    fixed = [" ".join(s.split()) for s in arr.filter(needs).to_pylist()]  # a filter, unlike a take, does not concatenate chunks
    return pc.replace_with_mask(_combined(arr), needs, pa.array(fixed, type=pa.large_string()))


def chat_key(text: str) -> str:
    """Key of a chat prompt stored as JSON text: messages with whitespace-normalised contents."""
    messages = json.loads(text)
    norm = [{"role": m["role"], "content": " ".join(m["content"].split())} for m in messages]
    return CHAT_KEY_PREFIX + json.dumps(norm, ensure_ascii=False, separators=(",", ":"))


def prompt_keys(prompt, is_chat) -> pa.Array:
    """Keys of prompts: normalised text, or :func:`chat_key` for chat prompts."""
    keys = normalize_ws(prompt)
    chat = np.asarray(is_chat, dtype=bool)
    if chat.any():
        mask = pa.array(chat)
        texts = _as_array(prompt).filter(mask).to_pylist()
        keys = pc.replace_with_mask(_combined(keys), mask, pa.array([chat_key(t) for t in texts], type=pa.large_string()))
    return keys


def hash64(values, chunk: int = 1 << 16) -> np.ndarray:
    """blake2b-64 of each string's UTF-8 bytes (uint64). Nulls hash like the empty string.

    Arrow input is hashed straight from its byte buffer, a chunk of rows at a time (no Python
    strings are made: each row is a zero-copy slice of the buffer)."""
    if not isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = pa.array(list(values), type=pa.large_string())
    out = np.empty(len(values), np.uint64)
    blake = hashlib.blake2b
    pos = 0
    for arr in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            arr = arr.cast(pa.large_string())
        if arr.null_count:
            arr = pc.fill_null(arr, "")  # a null slot may still span bytes: rewrite it empty
        width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        for start in range(0, len(arr), chunk):
            part = arr.slice(start, chunk)
            n = len(part)
            if not n:
                continue
            _, offsets_buf, data_buf = part.buffers()
            offsets = np.frombuffer(offsets_buf, width)[part.offset: part.offset + n + 1]
            data = memoryview(data_buf if data_buf is not None else b"")[int(offsets[0]):int(offsets[-1])]
            bounds = (offsets - offsets[0]).tolist()
            blob = b"".join([blake(data[a:b], digest_size=8).digest()
                             for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
            out[pos:pos + n] = np.frombuffer(blob, dtype="<u8")
            pos += n
    return out


def _fmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x = x * _M1
    x = x ^ (x >> np.uint64(33))
    x = x * _M2
    return x ^ (x >> np.uint64(33))


def mix64(*columns: np.ndarray) -> np.ndarray:
    """Order-sensitive combination of uint64 columns (broadcasting), well mixed."""
    h = np.full(np.broadcast(*columns).shape if len(columns) > 1 else np.shape(columns[0]), _GOLDEN, np.uint64)
    with np.errstate(over="ignore"):
        for c in columns:
            h = _fmix(h ^ (np.asarray(c, np.uint64) + _GOLDEN + (h << np.uint64(6)) + (h >> np.uint64(2))))
    return h


def float_bits(x: np.ndarray, decimals: int = 6) -> np.ndarray:
    """uint64 bits of floats rounded to ``decimals`` (so summation order does not change hashes)."""
    return np.round(np.asarray(x, np.float64), decimals).view(np.uint64)


def hex16(h: np.ndarray) -> pa.Array:
    """Lower-case 16-hex-digit strings of uint64 values."""
    text = np.asarray(h, np.uint64).astype(">u8").tobytes().hex().encode("ascii")
    return pa.array(np.frombuffer(text, dtype="S16")).cast(pa.string())


def unit_interval(h: np.ndarray) -> np.ndarray:
    """uint64 hashes as floats uniform in [0, 1)."""
    return (np.asarray(h, np.uint64) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign_splits(prompt_hash: np.ndarray, train: float, validation: float, salt: str) -> np.ndarray:
    """0 (train), 1 (validation) or 2 (test) per prompt, from the salted prompt hash."""
    u = unit_interval(mix64(prompt_hash, hash64([salt])[0]))
    return np.where(u < train, 0, np.where(u < train + validation, 1, 2)).astype(np.int8)


def parquet_options(schema: pa.Schema) -> dict:
    """ParquetWriter options: no dictionary attempts or min/max statistics on free-text columns
    (unique values make both pure cost), both kept for the other columns."""
    text = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    free_text = {n for n in text if n in FREE_TEXT}
    others = [f.name for f in schema if f.name not in free_text]
    return {"use_dictionary": others, "write_statistics": others}


FREE_TEXT = frozenset({"prompt", "response", "response_a", "response_b", "chosen", "rejected", "raw", "metadata"})
"""Columns of long, mostly unique text in alignflow's tables."""


def group_ids(*cols: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense ids of identical rows across integer columns (exact); ids follow the rows'
    lexicographic order. Columns are packed into one mixed-radix int64 key, re-densified
    whenever the next column would overflow it."""
    n = len(cols[0])
    if n == 0:
        return np.zeros(0, np.int64), 0
    key = None
    for col in cols:
        c = np.asarray(col, np.int64)
        lo, hi = int(c.min()), int(c.max())
        if hi - lo >= 1 << 40:  # sparse values (timestamps, hashes): rank them first
            c = np.unique(c, return_inverse=True)[1].astype(np.int64)
            lo, hi = 0, int(c.max())
        c = c - lo
        span = hi - lo + 1
        if key is None:
            key = c
            continue
        if (int(key.max()) + 1) * span >= 1 << 62:
            key = np.unique(key, return_inverse=True)[1].astype(np.int64)
        key = key * span + c
    return _dense(key)


def _dense(key: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense ids of non-negative int64 keys in sorted key order, and how many there are. Keys
    spanning at most twice their count (ids already, or nearly) are ranked by counting, not
    by sorting; both give the same ids."""
    span = int(key.max()) + 1
    if span <= 2 * len(key) + 1024:
        present = np.bincount(key, minlength=span) > 0
        rank = np.cumsum(present) - 1
        return rank[key].astype(np.int64, copy=False), int(rank[-1]) + 1
    uniq, ids = np.unique(key, return_inverse=True)
    return ids.astype(np.int64).reshape(-1), len(uniq)


def first_of_groups(*cols: np.ndarray) -> np.ndarray:
    """Mask keeping the first row (in row order) of each group of identical rows."""
    if len(cols[0]) == 0:
        return np.zeros(0, bool)
    return ~pd.Series(group_ids(*cols)[0]).duplicated(keep="first").to_numpy()


def digest_of_rows(row_hashes: np.ndarray, tag: str) -> str:
    """Order-independent sha256 (hex) of a multiset of row hashes, under a schema ``tag``."""
    h = hashlib.sha256(tag.encode())
    h.update(np.sort(np.asarray(row_hashes, np.uint64)).astype("<u8").tobytes())
    return h.hexdigest()


def encode(arrays: list) -> tuple[pa.Array, list[np.ndarray]]:
    """Jointly dictionary-encode string arrays -> (distinct values, int64 codes per array; null -> -1)."""
    chunks = [c for a in arrays for c in (_as_array(a).chunks if isinstance(a, pa.ChunkedArray) else [_as_array(a)])]
    encoded = pc.dictionary_encode(pa.chunked_array(chunks, type=pa.large_string()))
    dictionary = encoded.chunk(0).dictionary if encoded.num_chunks else pa.array([], pa.large_string())
    flat = (np.concatenate([pc.fill_null(c.indices, -1).to_numpy().astype(np.int64) for c in encoded.chunks])
            if encoded.num_chunks else np.zeros(0, np.int64))
    return dictionary, np.split(flat, np.cumsum([len(a) for a in arrays])[:-1]) if arrays else []


@dataclass
class Vocabulary:
    """Distinct normalised texts with a representative original for each.

    ``codes`` index ``keys``/``originals``/``hashes``; the representative is the smallest
    original (in code-point order) among those sharing a key, so it does not depend on row order.
    """

    keys: pa.Array
    originals: pa.Array
    key_hash: np.ndarray
    original_hash: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


def build_vocabulary(columns: list[tuple[pa.Array, pa.Array]]) -> tuple[Vocabulary, list[np.ndarray]]:
    """Encode (original, key) column pairs jointly -> vocabulary and int64 codes per column."""
    dictionary, out_codes = encode([k for _, k in columns])
    originals = dictionary
    best: dict[int, str] = {}
    plain = np.zeros(len(dictionary), bool)
    for (orig, key), code in zip(columns, out_codes, strict=True):
        orig = _as_array(orig)
        if key is orig:
            plain[code] = True  # nothing was normalised: every original is its key
            continue
        differs = pc.fill_null(pc.not_equal(orig, key), True).to_numpy(zero_copy_only=False)
        plain[code[~differs]] = True
        if differs.any():
            idx = np.flatnonzero(differs)
            for c, text in zip(code[idx].tolist(), orig.filter(pa.array(differs)).to_pylist(), strict=True):
                if text is not None and (c not in best or text < best[c]):
                    best[c] = text
    key_hash = hash64(dictionary)
    original_hash = key_hash.copy()
    if best:
        # a key that also occurs verbatim competes with its variants
        dict_list = dictionary.to_pylist() if len(best) > len(dictionary) // 4 else None
        for c in list(best):
            own = dict_list[c] if dict_list is not None else dictionary[c].as_py()
            if plain[c] and own < best[c]:
                del best[c]
        if best:
            mask = np.zeros(len(dictionary), bool)
            idx = np.fromiter(best, np.int64, len(best))
            mask[idx] = True
            order = np.argsort(idx)
            values = [best[int(c)] for c in idx[order]]
            originals = pc.replace_with_mask(dictionary, pa.array(mask), pa.array(values, type=pa.large_string()))
            original_hash[idx[order]] = hash64(values)
    return Vocabulary(dictionary, originals, key_hash, original_hash), out_codes
