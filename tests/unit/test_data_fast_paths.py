"""The data layer's fast paths against plain reference implementations, on messy input.

Each fast path (windowed byte scans, the block scan of text files, reason collection by integer
codes, dense ids by counting, a text scan reused from the ledger check, threaded builds) must
give exactly what the obvious implementation gives.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.data.coerce import Problems
from tasks.data.keys import (
    _odd_whitespace,
    build_vocabulary,
    group_ids,
    hash64,
    normalize_ws,
    prompt_keys,
    rows_with_bytes,
)
from tasks.data.readers import read_source
from tasks.data.scan import PatchedFile, scan_text
from tasks.data.schemas import _fits, _has_control_char, _has_replacement_char
from tasks.data.validate import _reasons_by_row

PIECES = ["a", "bc", " ", "  ", "\t", "\n", "\r", "\x07", "\x7f", "\x1f", "\ufffd", "é", "✓", "\u00a0", "\u2003",
          "\u3000", "\u2028", "\U0001f600", "\uefbd", "x" * 40]
TEXTS = st.lists(st.one_of(st.none(), st.lists(st.sampled_from(PIECES), max_size=12).map("".join)), max_size=40)
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@settings(max_examples=150, deadline=None)
@given(values=TEXTS, window=st.sampled_from([1, 2, 3, 5, 16, 1 << 18]), chunks=st.integers(1, 4))
def test_windowed_byte_scans_match_per_row_checks(values, window, chunks):
    bounds = [i * len(values) // chunks for i in range(chunks + 1)]
    arr = pa.chunked_array([pa.array(values[a:b], pa.large_string()) for a, b in zip(bounds, bounds[1:], strict=False)],
                           pa.large_string())
    texts = [v for c in arr.chunks for v in c.to_pylist()]
    control = rows_with_bytes(arr, _has_control_char, window=window)
    fffd = rows_with_bytes(arr, _has_replacement_char, window=window)
    odd = rows_with_bytes(arr, _odd_whitespace, edges=True, window=window)
    assert control.tolist() == [v is not None and CONTROL.search(v) is not None for v in texts]
    assert fffd.tolist() == [v is not None and "\ufffd" in v for v in texts]
    printable = [v is not None and CONTROL.search(v.replace("\t", "").replace("\n", "").replace("\r", "")) is None
                 and not any(c in v for c in "\x1c\x1d\x1e\x1f") for v in texts]
    for v, o, p in zip(texts, odd.tolist(), printable, strict=True):
        if v is not None and p:  # the whitespace scan is exact on printable text
            assert o == (" ".join(v.split()) != v)


@settings(max_examples=80, deadline=None)
@given(values=TEXTS, limit=st.integers(0, 30))
def test_length_check_counts_characters_not_bytes(values, limit):
    s = pd.Series(values, dtype="str")
    assert _fits(s, limit).tolist() == [v is None or len(v) <= limit for v in values]


def test_length_check_on_many_chunks_filters_the_long_rows():
    rng = random.Random(5)
    values = [None if rng.random() < 0.05 else "é" * rng.randint(0, 12) for _ in range(2000)]
    arr = pa.chunked_array([pa.array(values[i:i + 37], pa.large_string()) for i in range(0, 2000, 37)])
    s = arr.to_pandas()  # the column keeps its 55 chunks
    assert pa.array(s).num_chunks == 55
    assert _fits(s, 8).tolist() == [v is None or len(v) <= 8 for v in values]


def _blake64(values) -> list[int]:
    return [int.from_bytes(hashlib.blake2b((v or "").encode(), digest_size=8).digest(), "little") for v in values]


@settings(max_examples=80, deadline=None)
@given(values=TEXTS, chunks=st.integers(1, 4), chunk=st.sampled_from([1, 3, 1 << 16]), large=st.booleans(),
       cut=st.integers(0, 3))
def test_hash64_on_arrow_buffers_equals_blake2b_of_the_text(values, chunks, chunk, large, cut):
    kind = pa.large_string() if large else pa.string()
    bounds = [i * len(values) // chunks for i in range(chunks + 1)]
    arr = pa.chunked_array([pa.array(values[a:b], kind) for a, b in zip(bounds, bounds[1:], strict=False)], type=kind)
    assert hash64(arr, chunk=chunk).tolist() == _blake64(values)
    flat = pa.array(values, kind).slice(min(cut, len(values)))  # a sliced array: offsets start past 0
    assert hash64(flat, chunk=chunk).tolist() == _blake64(values[min(cut, len(values)):])
    assert hash64(values, chunk=chunk).tolist() == _blake64(values)  # a Python list


def test_hash64_of_null_slots_that_span_bytes_and_of_untyped_nulls():
    data = pa.py_buffer(b"abcdef")
    offsets = pa.py_buffer(np.array([0, 2, 4, 6], np.int32).tobytes())
    validity = pa.py_buffer(np.packbits(np.array([1, 0, 1, 0, 0, 0, 0, 0], np.uint8), bitorder="little").tobytes())
    arr = pa.Array.from_buffers(pa.string(), 3, [validity, offsets, data], null_count=1)  # row 1 is null over "cd"
    assert hash64(arr).tolist() == _blake64(["ab", None, "ef"])
    assert hash64(pa.array([None, None])).tolist() == _blake64([None, None])
    assert hash64(pa.chunked_array([], pa.string())).tolist() == []


def test_keys_and_vocabulary_on_many_chunks_equal_the_python_formulation():
    rng = random.Random(11)
    plain = ["".join(rng.choice(PIECES[:7] + PIECES[11:17]) for _ in range(rng.randint(1, 12))) for _ in range(1500)]
    chat = [json.dumps([{"role": "user", "content": f" hi  {i} "}]) for i in range(40)]
    texts = plain + chat
    is_chat = np.array([False] * len(plain) + [True] * len(chat))
    arr = pa.chunked_array([pa.array(texts[i:i + 53], pa.large_string()) for i in range(0, len(texts), 53)])
    keys = prompt_keys(arr, is_chat)
    expect = [" ".join(t.split()) for t in plain] + [
        "\x01" + json.dumps([{"role": "user", "content": f"hi {i}"}], separators=(",", ":")) for i in range(40)]
    assert keys.to_pylist() == expect
    vocab, (codes,) = build_vocabulary([(arr, keys)])
    best: dict[str, str] = {}
    for t, k in zip(texts, expect, strict=True):
        best[k] = min(best.get(k, t), t)
    assert [vocab.keys[c].as_py() for c in codes] == expect
    assert [vocab.originals[c].as_py() for c in codes] == [best[k] for k in expect]
    assert vocab.key_hash.tolist() == _blake64(vocab.keys.to_pylist())
    assert vocab.original_hash.tolist() == _blake64(vocab.originals.to_pylist())


def test_normalize_ws_on_many_chunks_equals_split_join():
    rng = random.Random(3)
    values = ["".join(rng.choice(PIECES[:7] + PIECES[11:17]) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    arr = pa.chunked_array([pa.array(values[i:i + 70], pa.large_string()) for i in range(0, 3000, 70)])
    assert normalize_ws(arr).to_pylist() == [" ".join(v.split()) for v in values]


def _reference_scan(data: bytes, block: int) -> dict:
    """What a scan must report, from splitting the bytes into lines (a byte-order mark is
    looked for in the first block read)."""
    parts = data.split(b"\n")
    complete, tail = parts[:-1], parts[-1]
    lines = complete + ([tail] if tail.strip() else [])
    starts = np.cumsum([0] + [len(p) + 1 for p in parts])
    bad_lines, bad_spans, bad_bytes = [], [], []
    for i, line in enumerate(lines):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines.append(i)
            bad_spans.append((int(starts[i]), int(starts[i]) + len(line)))
            pos = 0
            while pos < len(line):
                try:
                    line[pos:].decode("utf-8")
                    break
                except UnicodeDecodeError as err:
                    bad_bytes.append((int(starts[i]) + pos + err.start, int(starts[i]) + pos + err.end))
                    pos += err.end
    return {"digest": hashlib.sha256(data).hexdigest(), "lines": len(lines),
            "blank_lines": any(p in (b"", b"\r") for p in complete), "bad_lines": bad_lines,
            "bad_spans": bad_spans, "bad_bytes": bad_bytes, "bom": data[:block].startswith(codecs.BOM_UTF8),
            "longest_line": max([len(p) + 1 for p in complete] + [len(tail) if tail.strip() else 0])}


ATOMS = [b"a", b"bc ", b"\n", b"\r\n", b"\xff", b"\xe2\x82", b"\xe2\x82\xac", b"\xc3\xa9", b"\xef\xbb\xbf", b" ",
         b"\n\n", b'{"x": 1}', b"\xf0\x9f\x98\x80", b"\x80", b"\xed\xa0\x80"]


@settings(max_examples=150, deadline=None)
@given(atoms=st.lists(st.sampled_from(ATOMS), max_size=60), block=st.sampled_from([1, 2, 3, 7, 64, 1 << 24]))
def test_text_scan_matches_a_line_by_line_reference(tmp_path_factory, atoms, block):
    data = b"".join(atoms)
    path = tmp_path_factory.mktemp("scan") / "f.jsonl"
    path.write_bytes(data)
    scan = scan_text(path, block=block)
    got = {"digest": scan.digest, "lines": scan.lines, "blank_lines": scan.blank_lines,
           "bad_lines": scan.bad_lines.tolist(), "bad_spans": [tuple(s) for s in scan.bad_spans.tolist()],
           "bad_bytes": [tuple(s) for s in scan.bad_bytes.tolist()], "bom": scan.bom, "longest_line": scan.longest_line}
    assert got == _reference_scan(data, block)


def _reference_reasons(problems: Problems) -> pd.Series:
    """The pandas formulation: dedup, drop ``missing:F`` where F has a sharper reason, sort, group."""
    pos, reasons = problems.arrays()
    df = pd.DataFrame({"pos": pos, "reason": reasons}).drop_duplicates()
    fields = df["reason"].str.split(":", n=1).str[1]
    sharper = df[~df["reason"].str.startswith("missing:") & fields.notna()]
    sharp = set(zip(sharper["pos"], sharper["reason"].str.split(":", n=1).str[1], strict=True))
    missing = df["reason"].str.startswith("missing:")
    drop = missing & pd.Series([(p, f) in sharp for p, f in zip(df["pos"], fields, strict=True)], index=df.index)
    return df[~drop].sort_values(["pos", "reason"]).groupby("pos", sort=True)["reason"].agg(list)


@settings(max_examples=150, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 30), st.sampled_from(
    ["missing:prompt", "blank:prompt", "missing:choice", "invalid_value:choice", "duplicate_row", "missing:x",
     "too_long:response_a", "missing:response_a", "kind_mismatch", "wrong_type:", "missing:", "b:é"])), max_size=60))
def test_reason_collection_matches_the_pandas_formulation(entries):
    problems = Problems()
    for pos, reason in entries:
        problems.add([pos], reason)
    got = _reasons_by_row(problems)
    if not entries:
        assert got.empty
        return
    want = _reference_reasons(problems)
    assert got.index.tolist() == want.index.tolist() and got.tolist() == want.tolist()


def test_dense_ids_by_counting_equal_sorting():
    rng = np.random.default_rng(0)
    for n, hi in [(1, 1), (50, 3), (1000, 900), (1000, 5000), (4000, 10**9)]:
        cols = [rng.integers(0, hi, n), rng.integers(-2, 3, n)]
        for use in (cols[:1], cols):
            ids, k = group_ids(*use)
            uniq, inv = np.unique(np.stack(use, axis=1), axis=0, return_inverse=True)
            assert k == len(uniq) and ids.tolist() == inv.reshape(-1).tolist()


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_reused_text_scan_reads_like_a_fresh_one(tmp_path, fmt):
    rows = [{"prompt": f"p{i}", "response_a": f"a{i}", "response_b": f"b{i}", "choice": "a"} for i in range(40)]
    if fmt == "jsonl":
        lines = [json.dumps(r).encode() for r in rows]
        lines[5] = lines[5].replace(b"a5", b"a\xff5")
        lines[9] = b"{broken"
        data = b"\n".join(lines) + b"\n"
    else:
        data = ("prompt,response_a,response_b,choice\n" + "".join(
            f"{r['prompt']},{r['response_a']},{r['response_b']},{r['choice']}\n" for r in rows)).encode()
        data = data.replace(b"a5,", b"a\xfe5,").replace(b"p9,a9", b"p9,a9,extra")
    path = tmp_path / f"f.{fmt}"
    path.write_bytes(data)
    fresh, reused = read_source(path), read_source(path, scan=scan_text(path))
    assert fresh.frame.equals(reused.frame) and fresh.errors == reused.errors and fresh.digest == reused.digest
    assert fresh.row_reasons == reused.row_reasons and (fresh.rows == reused.rows).all()


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=300), cuts=st.lists(st.integers(0, 300), max_size=8),
       sizes=st.lists(st.integers(1, 64), min_size=1, max_size=6), how=st.sampled_from(["read_buffer", "read", "readinto"]))
def test_patched_file_masks_the_spans_however_it_is_read(tmp_path_factory, data, cuts, sizes, how):
    """pyarrow reads through ``read_buffer``; every way of reading, in any block sizes, gives the
    file with each span's bytes turned to '?'."""
    path = tmp_path_factory.mktemp("patched") / "f.bin"
    path.write_bytes(data)
    ends = sorted({min(c, len(data)) for c in cuts})
    spans = np.array([(a, b) for a, b in zip(ends[0::2], ends[1::2], strict=False) if b > a], np.int64).reshape(-1, 2)
    expected = bytearray(data)
    for a, b in spans.tolist():
        expected[a:b] = b"?" * (b - a)
    got, f, k = bytearray(), PatchedFile(path, spans), 0
    while True:
        size = sizes[k % len(sizes)]
        k += 1
        if how == "readinto":
            buf = bytearray(size)
            n = f.readinto(buf)
            piece = bytes(buf[:n])
        else:
            piece = bytes(getattr(f, how)(size))
        if not piece:
            break
        got += piece
    f.close()
    assert bytes(got) == bytes(expected)


def test_jsonl_with_invalid_utf8_reads_the_same_in_small_blocks(tmp_path, monkeypatch):
    """Invalid bytes in many blocks (each patched as pyarrow reads it) give the same rows and
    reasons as one block."""
    import tasks.data.json_reader as json_reader

    rows = [json.dumps({"prompt": f"p{i}", "response_a": f"a{i} " * 20, "response_b": f"b{i}", "choice": "a"})
            .encode() for i in range(3000)]
    for i in range(0, 3000, 97):
        rows[i] = rows[i].replace(b'"b%d"' % i, b'"b%d \xff\xfe"' % i)
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    whole = read_source(str(path))
    monkeypatch.setattr(json_reader, "JSON_BLOCK_BITS", 14)  # 16 KiB: ~20 blocks
    blocks = read_source(str(path))
    pd.testing.assert_frame_equal(whole.frame, blocks.frame)
    assert whole.row_reasons == blocks.row_reasons and len(whole.row_reasons) == 31
    assert set(map(tuple, whole.row_reasons.values())) == {("invalid_utf8:response_b",)}
