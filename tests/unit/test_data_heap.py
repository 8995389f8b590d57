"""The data stages' heap setting: freed large buffers stay in the heap inside, go back outside."""

from __future__ import annotations

import ctypes
import os
import platform

import numpy as np
import pytest

from tasks.data.heap import retained_heap

glibc = platform.libc_ver()[0] == "glibc" and not {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


@pytest.mark.skipif(not glibc, reason="glibc only, and only when the user has not set the malloc environment")
def test_freed_buffers_stay_in_the_heap_inside_and_are_returned_after():
    size = 64 << 20
    before = _mallinfo()
    buffer = np.ones(size, np.uint8)
    assert _mallinfo().hblkhd >= before.hblkhd + size  # outside: its own mapping
    del buffer
    with retained_heap(), retained_heap():  # nests
        buffer = np.ones(size, np.uint8)
        inside = _mallinfo()
        assert inside.hblkhd < before.hblkhd + size and inside.arena >= size  # from the heap
        del buffer
        assert _mallinfo().fordblks >= size  # freed, but kept for the next buffer
    after = _mallinfo()
    assert after.fordblks < size and after.arena < inside.arena - size // 2  # given back on leaving
    buffer = np.ones(size, np.uint8)
    assert _mallinfo().hblkhd >= after.hblkhd + size and buffer.nbytes == size  # defaults again
