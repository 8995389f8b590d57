"""Text keys and hashes: normalisation equals Python's split/join, grouping is exact, hashes are stable."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.data.keys import assign_splits, digest_of_rows, group_ids, hash64, hex16, mix64, normalize_ws

SPACES = " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
TEXT = st.text(alphabet=st.sampled_from(list(SPACES) + list("ab é✓\u200b")), max_size=12)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(TEXT, st.none()), max_size=8))
def test_normalize_ws_matches_python_split_join(values):
    got = normalize_ws(pa.array(values, pa.large_string())).to_pylist()
    assert got == [None if v is None else " ".join(v.split()) for v in values]


@settings(max_examples=100, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 2), st.sampled_from([0, 2**40, -(2**60)])),
                     max_size=30))
def test_group_ids_are_exact_and_follow_sorted_order(rows):
    cols = [np.array([r[i] for r in rows], np.int64) for i in range(3)] if rows else [np.zeros(0, np.int64)] * 3
    ids, n = group_ids(*cols)
    assert n == len(set(rows))
    for i, a in enumerate(rows):
        for j, b in enumerate(rows):
            assert (ids[i] == ids[j]) == (a == b)
            assert (ids[i] < ids[j]) == (a < b)


def test_hashes_are_fixed_values():
    """blake2b-64 little-endian: the same on every machine and version (ids and digests rely on it)."""
    expected = [hashlib.blake2b(t.encode(), digest_size=8).digest()[::-1].hex() for t in ("", "prompt")]
    assert hex16(hash64(["", "prompt"])).to_pylist() == expected == ["b4b2797457a0a6e4", "cdd6be63af8f0fb8"]
    assert mix64(np.array([1], np.uint64), np.array([2], np.uint64))[0] != \
        mix64(np.array([2], np.uint64), np.array([1], np.uint64))[0]


def test_digest_is_order_free_and_splits_are_stable():
    h = hash64([f"prompt {i}" for i in range(5000)])
    assert digest_of_rows(h, "t") == digest_of_rows(h[::-1], "t") != digest_of_rows(h[1:], "t")
    splits = assign_splits(h, 0.8, 0.1, "salt")
    assert (splits == assign_splits(h.copy(), 0.8, 0.1, "salt")).all()
    share = pd.Series(splits).value_counts(normalize=True)
    assert abs(share[0] - 0.8) < 0.03 and abs(share[1] - 0.1) < 0.02
    assert (splits != assign_splits(h, 0.8, 0.1, "other")).mean() > 0.2
