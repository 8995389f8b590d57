"""Fuzz (hypothesis): random bytes and random JSON structures through every reader.

For each example the file is read and validated as a landing file would be. Asserted: nothing
raises, every input row is accounted for (``rows_in == rows_valid + rows_quarantined``, the
quarantine holds ``rows_quarantined`` rows, each with at least one reason), and for JSON lines
``rows_in`` is the number of non-blank lines, counted here independently of the readers.

Examples per test: ``FUZZ_EXAMPLES`` (default 100; ALIGNFLOW_FUZZ_EXAMPLES=N for a longer hunt),
derandomised so CI runs the same cases every time: four tests x 100 plus the datasets-folder
test's 33 = 433 cases (the JSON-structures test reads each case twice, as lines and as an
array), about 30 s on 2 cores. It found that a first line ``null`` crashes pyarrow's JSON reader.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.data.landing import read_and_validate
from tasks.data.settings import IngestSettings, SourceSettings

FUZZ_EXAMPLES = int(os.environ.get("ALIGNFLOW_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

FIELDS = ["prompt", "response", "response_a", "response_b", "choice", "score", "label", "responses", "ranking",
          "chosen", "rejected", "completions", "instruction", "is_chat", "kind", "metadata", "created_at",
          "annotator_id", "score_chosen", "score_rejected", "messages"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(["a", "b", "tie", "up", "false", "true", "\ufffd", "",
                                                           "\n\nHuman: hi\n\nAssistant: yo", "[{\"role\": \"user\"}]"]))
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]),
                                           "content": st.one_of(st.text(max_size=8), st.none())}), max_size=3)
VALUES = st.recursive(st.one_of(SCALARS, MESSAGES), lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=5)), inner,
                                                 max_size=4)), max_leaves=12)


def _deep(levels: int, leaf):
    value = leaf
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


DEEP = st.builds(_deep, st.sampled_from([30, 63, 65, 200, 1500]), SCALARS)
RECORDS = st.dictionaries(st.sampled_from(FIELDS), st.one_of(VALUES, DEEP), max_size=8)
TYPED_DEEP = st.builds(_deep, st.sampled_from([30, 63, 65, 100]), SCALARS)  # Arrow types: json.dumps in _cell recurses
TYPED_RECORDS = st.dictionaries(st.sampled_from(FIELDS), st.one_of(VALUES, TYPED_DEEP), max_size=8)
LINE_VALUES = st.one_of(RECORDS, RECORDS, RECORDS, VALUES)
TEXTS = st.one_of(st.binary(max_size=600), st.lists(st.one_of(st.binary(max_size=60), st.sampled_from([
    b"", b"{}", b"[", b"{\"prompt\": \"x\"", b"\xef\xbb\xbf{}", b"\x00\x00", b"\xff\xfe", b"\"a\",\"b\"", b",,,",
    b"[" * 3000, b"{\"a\":" * 2000])), max_size=12).map(b"\n".join))


def _check(path: Path, expected_rows: int | None = None):
    result = read_and_validate([SourceSettings(path=str(path))], IngestSettings(quarantine_max_share=1.0))
    report = result.report
    assert report.rows_in == report.rows_valid + report.rows_quarantined
    assert len(result.quarantine) == report.rows_quarantined
    assert sum(len(f) for f in result.valid.values()) == report.rows_valid
    assert all(len(r) for r in result.quarantine["reasons"])
    if expected_rows is not None:
        assert report.rows_in == expected_rows
    return result


def _non_blank_lines(data: bytes) -> int:
    lines = data.split(b"\n")
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return sum(1 for line in lines if line.strip())


@FUZZ
@given(data=TEXTS, suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]))
def test_random_bytes_through_every_reader(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        if suffix == ".parquet" and data[:1] == b"P":  # sometimes a real footer around the junk
            data = b"PAR1" + data + b"PAR1"
        path.write_bytes(data)
        expected = _non_blank_lines(data) if suffix == ".jsonl" else None
        _check(path, expected)


@FUZZ
@given(values=st.lists(LINE_VALUES, max_size=10))
def test_random_json_lines_and_arrays(values):
    with tempfile.TemporaryDirectory() as tmp:
        lines = [json.dumps(v) for v in values]
        jsonl = Path(tmp) / "f.jsonl"
        jsonl.write_text("".join(line + "\n" for line in lines))
        _check(jsonl, len(lines))
        array = Path(tmp) / "f.json"
        array.write_text("[" + ",".join(lines) + "]")
        _check(array, len(lines) if lines else 0)


def _source_rows(records: list[dict]) -> int | None:
    """The rows a table of ``records`` must count in, or None where validation expands records
    (UltraFeedback's layout, ``completions`` beside a prompt: one row per completion, documented
    in tasks.data.validate) and only the reconciliation can be checked."""
    names = {k for r in records for k in r}
    return None if "completions" in names and names & {"prompt", "instruction"} else len(records)


def _cell(v) -> str | None:
    return v if isinstance(v, str) or v is None else json.dumps(v)


@FUZZ
@given(records=st.lists(TYPED_RECORDS, max_size=8), sep=st.sampled_from([",", "\t"]))
def test_random_structures_as_csv(records, sep):
    with tempfile.TemporaryDirectory() as tmp:
        frame = pd.DataFrame([{k: _cell(v) for k, v in r.items()} for r in records])
        path = Path(tmp) / ("f.csv" if sep == "," else "f.tsv")
        # CRLF line ends: the csv writer then quotes every field holding a CR or LF (with LF ends it
        # leaves a bare CR unquoted, which CSV readers take for a line end: another file, more rows)
        frame.to_csv(path, index=False, sep=sep, lineterminator="\r\n")
        _check(path, _source_rows(records) if len(frame.columns) else None)


def _arrow_column(values: list) -> pa.Array:
    """The column as Arrow infers it (lists, structs, mixed numbers), or as JSON text when it can't."""
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.array([_cell(v) for v in values], pa.string())


@FUZZ
@given(records=st.lists(TYPED_RECORDS, min_size=1, max_size=8))
def test_random_structures_as_parquet(records):
    with tempfile.TemporaryDirectory() as tmp:
        names = sorted({k for r in records for k in r})
        table = pa.table({n: _arrow_column([r.get(n) for r in records]) for n in names}) if names else \
            pa.table({"x": pa.nulls(len(records))})
        path = Path(tmp) / "f.parquet"
        try:
            pq.write_table(table, path)
        except (pa.ArrowException, ValueError):  # a type Parquet cannot store (e.g. an empty struct)
            table = pa.table({n: pa.array([_cell(r.get(n)) for r in records], pa.string()) for n in names})
            pq.write_table(table, path)
        try:
            pq.ParquetFile(path).close()
            expected = _source_rows(records)
        except (pa.ArrowException, OSError):  # Arrow writes a schema it will not read back (nesting past
            expected = 1  # its limit of 100): one unreadable file, quarantined as one row
        _check(path, expected)


@settings(max_examples=max(FUZZ_EXAMPLES // 3, 5), deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(records=st.lists(TYPED_RECORDS, min_size=1, max_size=6))
def test_random_structures_as_a_saved_dataset(records):
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        names = sorted({k for r in records for k in r}) or ["x"]
        table = pa.table({n: _arrow_column([r.get(n) for r in records]) for n in names})
        try:
            ds = datasets.Dataset(table)
            ds.save_to_disk(str(Path(tmp) / "ds"))
        except Exception:  # noqa: BLE001 - a table `datasets` itself refuses to save is not a reader case
            table = pa.table({n: pa.array([_cell(r.get(n)) for r in records], pa.string()) for n in names})
            datasets.Dataset(table).save_to_disk(str(Path(tmp) / "ds"))
        _check(Path(tmp) / "ds", _source_rows(records))
