"""Hostile input is contained (issue 14, point 2): no line, field or file crashes or stalls ingest.

Each test names what it feeds and asserts where every row went: valid, or quarantined with a
reason naming the file, the row and the field; an unreadable file becomes one quarantine row
while the other files of the batch are ingested.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.data import json_reader, readers
from tasks.data.handoff import read_validated_frame
from tasks.data.landing import ingest, quarantine_sample, read_and_validate
from tasks.data.readers import list_source_files, read_parquet
from tasks.data.report import EXIT_UNREADABLE, ingest_command
from tasks.data.scan import MAX_LINE_BYTES, MAX_NESTING, json_depth, scan_text
from tasks.data.settings import IngestSettings, SourceSettings
from tasks.data.validate import QuarantineThresholdExceeded

ROOT = Path(__file__).resolve().parents[2]


def _rows(n, start=0):
    return [{"prompt": f"p{i}", "response_a": f"a{i}", "response_b": f"b{i}", "choice": "a"}
            for i in range(start, start + n)]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _deep(levels: int) -> str:
    return '{"prompt": "p", "response_a": "a", "response_b": "b", "choice": "a", "metadata": ' + \
        "[" * levels + "]" * levels + "}"


def _validate(*paths, **settings):
    return read_and_validate([SourceSettings(path=str(p)) for p in paths], IngestSettings(**settings))


def _reasons(result) -> dict[tuple[str, int], list[str]]:
    q = result.quarantine
    return {(Path(f).name, int(r)): list(why) for f, r, why in zip(q["source_file"], q["source_row"], q["reasons"],
                                                                   strict=True)}


def test_json_depth_counts_brackets_outside_strings_only():
    assert json_depth(b'{"a": [[1]]}') == 3
    assert json_depth(b'{"a": "[[[[{{{{"}') == 1
    assert json_depth(rb'{"a": "x\"[[[[", "b": [1]}') == 2  # escaped quote: still inside the string
    assert json_depth(rb'{"a": "x\\", "b": [[1]]}') == 3  # escaped backslash: the string ends
    assert json_depth(b"[" * 70_000) == 70_000  # broken text is never counted too shallow


@pytest.mark.parametrize("blank_line", [False, True], ids=["arrow-path", "line-path"])
def test_deeply_nested_lines_are_quarantined_and_the_rest_is_valid(tmp_path, blank_line):
    # 3,000 levels raised RecursionError out of _parse_line on the line path; 100 levels got past
    # the Arrow path into code that recurses per level
    lines = [*map(json.dumps, _rows(3)), _deep(3000), _deep(MAX_NESTING + 36), _deep(MAX_NESTING - 2),
             *map(json.dumps, _rows(2, start=10))]
    if blank_line:
        lines.insert(1, "")
    path = _jsonl(tmp_path / "deep.jsonl", lines)
    result = _validate(path, quarantine_max_share=1.0)
    shift = int(blank_line)
    assert _reasons(result) == {("deep.jsonl", 4 + shift): ["too_deeply_nested"],
                                ("deep.jsonl", 5 + shift): ["too_deeply_nested"]}
    assert result.report.rows_valid == 6 and result.report.rows_in == 8


SEGFAULT_CHILD = textwrap.dedent("""
    import json, sys
    from tasks.data.landing import read_and_validate
    from tasks.data.settings import IngestSettings, SourceSettings
    res = read_and_validate([SourceSettings(path=sys.argv[1])], IngestSettings(quarantine_max_share=1.0))
    print(json.dumps({"valid": res.report.rows_valid, "reasons": res.report.reasons}))
""")


@pytest.mark.parametrize(("lines", "reason"), [
    ([*map(json.dumps, _rows(3)), _deep(60_000)], "too_deeply_nested"),
    ([*map(json.dumps, _rows(3)), _deep(200_000)], "too_deeply_nested"),
    (["null", *map(json.dumps, _rows(3))], "not_an_object"),  # found by the fuzz test: pyarrow 25 segfaults
    ([" null", *map(json.dumps, _rows(3))], "not_an_object"),
], ids=["60k-levels", "200k-levels", "null-first-line", "spaced-null-first-line"])
def test_lines_that_crashed_the_arrow_reader_do_not_kill_the_process(tmp_path, lines, reason):
    """Arrow's JSON reader recursed once per level on the C stack, and dereferences a null first
    row: exit 139 (SIGSEGV). Run in a child process, so a crash fails this test instead of
    taking the test runner down."""
    path = _jsonl(tmp_path / "bomb.jsonl", lines)
    proc = subprocess.run([sys.executable, "-c", SEGFAULT_CHILD, str(path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"valid": 3, "reasons": {reason: 1}}


def test_a_deep_json_array_element_is_quarantined(tmp_path):
    path = tmp_path / "arr.json"
    elements = [json.dumps(r) for r in _rows(2)] + [_deep(5000)]
    path.write_text("[" + ",".join(elements) + "]")
    result = _validate(path, quarantine_max_share=1.0)
    assert _reasons(result) == {("arr.json", 3): ["too_deeply_nested"]} and result.report.rows_valid == 2


def test_a_giant_line_is_quarantined_unread_and_its_raw_text_is_cut(tmp_path):
    path = tmp_path / "giant.jsonl"
    with path.open("wb") as f:
        f.write(json.dumps(_rows(1)[0]).encode() + b"\n")
        f.write(b'{"prompt": "' + b"\x00\xff junk " * (MAX_LINE_BYTES // 7) + b"\n")  # > MAX_LINE_BYTES, broken
        f.write(json.dumps(_rows(1, start=5)[0]).encode() + b"\n")
    scan = scan_text(path)
    assert scan.lines == 3 and scan.longest_line > MAX_LINE_BYTES
    result = _validate(path, quarantine_max_share=1.0)
    assert _reasons(result) == {("giant.jsonl", 2): ["line_too_long"]} and result.report.rows_valid == 2
    assert len(result.quarantine["raw"].iloc[0]) < 5000  # the whole line was 16 MiB


def test_csv_with_a_record_larger_than_arrows_default_block_is_read(tmp_path):
    big = "x" * (3 << 20)  # pyarrow's default 1 MiB block cannot hold this record
    frame = pd.DataFrame([*_rows(2), {"prompt": "p9", "response_a": big, "response_b": "b", "choice": "a"}])
    frame.to_csv(tmp_path / "big.csv", index=False)
    result = _validate(tmp_path / "big.csv", quarantine_max_share=1.0, max_text_chars=1000)
    assert _reasons(result) == {("big.csv", 4): ["too_long:response_a"]} and result.report.rows_valid == 2


def test_csv_is_chat_false_is_false(tmp_path):
    chat = json.dumps([{"role": "user", "content": "hi"}])
    rows = [{"prompt": "plain prompt", "is_chat": "false", "response_a": "a", "response_b": "b", "choice": "a"},
            {"prompt": "other plain", "is_chat": "False", "response_a": "a", "response_b": "b", "choice": "b"},
            {"prompt": chat, "is_chat": "true", "response_a": "a", "response_b": "b", "choice": "a"},
            {"prompt": "plain 0", "is_chat": "0", "response_a": "a", "response_b": "b", "choice": "a"},
            {"prompt": "odd", "is_chat": "maybe", "response_a": "a", "response_b": "b", "choice": "a"}]
    pd.DataFrame(rows).to_csv(tmp_path / "chat.csv", index=False)
    result = _validate(tmp_path / "chat.csv", quarantine_max_share=1.0)
    assert _reasons(result) == {("chat.csv", 6): ["invalid_value:is_chat"]}
    valid = result.valid["pairwise"]
    assert valid["is_chat"].tolist() == [False, False, True, False]


def _corrupt_parquet(path: Path) -> Path:
    pd.DataFrame(_rows(50)).to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + b"\x00" * 64 + data[-64:])  # a torn middle, the footer intact
    return path


def test_an_unreadable_file_is_quarantined_as_a_file_and_the_batch_goes_on(tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "store"
    landing.mkdir()
    _jsonl(landing / "good.jsonl", _rows(30))
    pd.DataFrame(_rows(20, start=100)).to_parquet(landing / "good.parquet")
    _corrupt_parquet(landing / "torn.parquet")
    (landing / "junk.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    (landing / "short.parquet").write_bytes(b"PAR1")
    result = ingest(IngestSettings(landing_dir=str(landing), quarantine_max_share=0.1), out)
    report = result.report
    assert report["rows_valid"] == 50 and report["rows_quarantined"] == 3 and report["rows_in"] == 53
    files = {Path(f["source_file"]).name: f for f in report["files"]}
    for name in ("torn.parquet", "junk.parquet", "short.parquet"):
        assert files[name]["unreadable"] == "unreadable_file" and files[name]["rows_quarantined"] == 1
        assert files[name]["notes"][0].startswith("not read (unreadable_file)")
    q = pd.read_parquet(result.quarantine)
    assert q["source_row"].tolist() == [0, 0, 0] and all(json.loads(r)["error"] for r in q["raw"])
    assert len(read_validated_frame(result.validated["pairwise"])) == 50


def test_an_unreadable_file_counts_against_the_quarantine_limit(tmp_path):
    _jsonl(tmp_path / "good.jsonl", _rows(10))
    _corrupt_parquet(tmp_path / "torn.parquet")
    result = _validate(tmp_path / "good.jsonl", tmp_path / "torn.parquet", quarantine_max_share=0.05)
    assert result.report.rows_quarantined == 1 and result.report.exceeded  # 1 of 11 > 5%
    with pytest.raises(QuarantineThresholdExceeded):
        result.raise_if_exceeded()


def test_ingest_command_on_only_unreadable_files_exits_unreadable(tmp_path):
    _corrupt_parquet(tmp_path / "torn.parquet")
    out = io.StringIO()
    assert ingest_command(str(tmp_path / "torn.parquet"), None, IngestSettings(), stream=out) == EXIT_UNREADABLE
    assert "unreadable_file" in out.getvalue() and "torn.parquet" in out.getvalue()


def test_wrong_parquet_schemas_quarantine_rows_not_the_run(tmp_path):
    table = pa.table({
        "prompt": pa.array([1, 2, 3], pa.int64()),  # numbers where text belongs
        "response_a": pa.array([b"\xff\xfe", b"ok", None], pa.binary()),
        "response_b": pa.array([{"x": 1}, {"x": 2}, {"x": 3}]),
        "choice": pa.array([["a"], ["b"], []], pa.list_(pa.string())),
        "metadata": pa.array([[("k", 1)], [], None], pa.map_(pa.string(), pa.int64())),
    })
    pq.write_table(table, tmp_path / "odd.parquet")
    result = _validate(tmp_path / "odd.parquet", quarantine_max_share=1.0)
    reasons = _reasons(result)
    assert set(reasons) == {("odd.parquet", 1), ("odd.parquet", 2), ("odd.parquet", 3)}
    assert all("wrong_type:prompt" in r and "wrong_type:response_b" in r for r in reasons.values())


def test_a_parquet_whose_every_column_nests_too_deep_quarantines_each_of_its_rows(tmp_path):
    """Nothing in it can be read, but its rows are counted (the hypothesis fuzz case: two records,
    one column 65 deep) rather than the file standing as one quarantined row."""
    value = None
    for i in range(MAX_NESTING + 1):
        value = [value] if i % 2 else {"k": value}
    pq.write_table(pa.table({"prompt": pa.array([None, value, value])}), tmp_path / "deep.parquet")
    result = _validate(tmp_path / "deep.parquet", quarantine_max_share=1.0)
    reasons = _reasons(result)
    assert set(reasons) == {("deep.parquet", 1), ("deep.parquet", 2), ("deep.parquet", 3)}
    assert all("too_deeply_nested:prompt" in r for r in reasons.values())
    assert result.report.rows_in == 3 and result.report.rows_valid == 0
    # more rows than the memory limit can list: the file is refused as a whole, as before
    with pytest.raises(readers.UnreadableSource) as err:
        read_parquet(tmp_path / "deep.parquet", max_bytes=100)
    assert err.value.reason == "too_deeply_nested"


def test_a_parquet_bomb_is_refused_once_its_rows_pass_the_memory_limit(tmp_path):
    """A few KiB that decompress (dictionary + RLE) to 200 MB of text."""
    text = "x" * 1000
    table = pa.table({"prompt": pa.array([text] * 200_000).dictionary_encode(),
                      "response_a": pa.array(["a"] * 200_000), "response_b": pa.array(["b"] * 200_000),
                      "choice": pa.array(["a"] * 200_000)})
    pq.write_table(table, tmp_path / "bomb.parquet", compression="zstd")
    size = (tmp_path / "bomb.parquet").stat().st_size
    assert size < 200_000_000 / 1000
    with pytest.raises(readers.UnreadableSource) as err:
        read_parquet(tmp_path / "bomb.parquet", max_bytes=50_000_000)
    assert err.value.reason == "too_large_decompressed"
    old = readers.MAX_DECOMPRESSED_BYTES
    try:
        readers.MAX_DECOMPRESSED_BYTES = 50_000_000
        _jsonl(tmp_path / "good.jsonl", _rows(5))
        result = _validate(tmp_path / "good.jsonl", tmp_path / "bomb.parquet", quarantine_max_share=1.0)
    finally:
        readers.MAX_DECOMPRESSED_BYTES = old
    assert _reasons(result) == {("bomb.parquet", 0): ["too_large_decompressed"]} and result.report.rows_valid == 5


def test_binary_junk_and_bad_encodings_are_row_reasons(tmp_path):
    path = tmp_path / "junk.jsonl"
    good = [json.dumps(r).encode() for r in _rows(3)]
    junk = [os.urandom(200).replace(b"\n", b" "), b'{"prompt": "\xc3\x28", "response_a": "a", "response_b": "b", '
            b'"choice": "a"}', "\ufeff{}".encode("utf-16")]
    path.write_bytes(b"\n".join([good[0], *junk, *good[1:]]) + b"\n")
    result = _validate(path, quarantine_max_share=1.0)
    reasons = _reasons(result)
    assert result.report.rows_valid == 3 and len(reasons) == 3
    assert reasons[("junk.jsonl", 3)] == ["invalid_utf8:prompt"]


def test_symlinks_out_of_the_landing_folder_are_refused_unread(tmp_path, caplog):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    secret = _jsonl(secret_dir / "passwd.jsonl", [{"prompt": "SECRET-TOKEN", "response_a": "x",
                                                   "response_b": "y", "choice": "?"}])
    landing, out = tmp_path / "landing", tmp_path / "store"
    (landing / "sub").mkdir(parents=True)
    _jsonl(landing / "good.jsonl", [*_rows(5), {"prompt": "bad", "response_a": "same", "response_b": "same",
                                               "choice": "a"}])
    os.symlink(secret, landing / "leak.jsonl")
    os.symlink(secret_dir, landing / "sub" / "dir-link.jsonl")
    os.symlink(landing / "good.jsonl", landing / "sub" / "inside.jsonl")  # stays inside: allowed
    refused: list[Path] = []
    listed = list_source_files(landing, ["*.jsonl"], refused)
    assert listed == [landing / "good.jsonl", landing / "sub" / "inside.jsonl"]
    assert refused == [landing / "leak.jsonl", landing / "sub" / "dir-link.jsonl"]
    assert "leak.jsonl" in caplog.text and "resolves outside" in caplog.text
    result = ingest(IngestSettings(landing_dir=str(landing), quarantine_max_share=0.5), out)
    assert str(landing / "leak.jsonl") not in result.sources
    refused_files = [f for f in result.report["files"] if f["unreadable"] == "symlink_outside_landing"]
    assert sorted(Path(f["source_file"]).name for f in refused_files) == ["dir-link.jsonl", "leak.jsonl"]
    assert all(f["rows_in"] == 0 for f in refused_files)  # on record, not counted as rows
    for written in out.rglob("*"):
        if written.is_file():
            assert b"SECRET-TOKEN" not in written.read_bytes(), written
    # the explicit check: `alignflow ingest FOLDER` reports them as refused files
    text = io.StringIO()
    ingest_command(str(landing), None, IngestSettings(quarantine_max_share=0.5), out_dir=tmp_path / "check",
                   stream=text)
    assert "symlink_outside_landing" in text.getvalue() and "SECRET-TOKEN" not in text.getvalue()
    q = pd.read_parquet(tmp_path / "check" / "quarantine.parquet")
    assert "SECRET-TOKEN" not in "".join(q["raw"])
    # and a path handed to the reader directly is refused the same way
    direct = read_and_validate([SourceSettings(path=str(landing / "leak.jsonl"))],
                               IngestSettings(landing_dir=str(landing), quarantine_max_share=1.0))
    assert _reasons(direct) == {("leak.jsonl", 0): ["symlink_outside_landing"]}


def test_the_quarantine_sample_for_mlflow_is_cut(tmp_path):
    long_text = "y" * 50_000
    _jsonl(tmp_path / "f.jsonl", [*_rows(2), {"prompt": long_text, "response_a": "a", "response_b": "a",
                                              "choice": "a"}])
    result = ingest(IngestSettings(sources=[SourceSettings(path=str(tmp_path / "f.jsonl"))],
                                   quarantine_max_share=1.0), tmp_path / "out")
    assert len(pd.read_parquet(result.quarantine)["raw"].iloc[0]) > 50_000  # the file keeps the row whole
    sample = quarantine_sample(result.quarantine)
    assert len(sample) == 1 and len(sample["raw"].iloc[0]) < 1100 and "[cut: " in sample["raw"].iloc[0]
    assert sample["reasons"].iloc[0] == "identical_responses; too_long:prompt"


def test_scan_of_a_giant_line_keeps_memory_bounded(tmp_path):
    path = tmp_path / "one-line.jsonl"
    with path.open("wb") as f:
        for _ in range(3):
            f.write(b"z" * MAX_LINE_BYTES)
    scan = scan_text(path, block=1 << 20)
    assert scan.lines == 1 and scan.longest_line == 3 * MAX_LINE_BYTES
    assert np.array_equal(scan.bad_lines, np.zeros(0))


def test_a_fifo_or_device_named_like_a_feedback_file_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")  # opening it for reading would block forever
    os.symlink("/dev/zero", tmp_path / "zero.csv")  # reading it would never end
    _jsonl(tmp_path / "good.jsonl", _rows(2))
    result = _validate(tmp_path / "pipe.jsonl", tmp_path / "zero.csv", tmp_path / "good.jsonl", quarantine_max_share=1.0)
    assert _reasons(result) == {("pipe.jsonl", 0): ["not_a_regular_file"], ("zero.csv", 0): ["not_a_regular_file"]}
    assert result.report.rows_valid == 2


def test_a_compressed_datasets_folder_is_refused_past_the_memory_limit(tmp_path):
    """`load_from_disk` decompresses a zstd Arrow stream whole: 2,000,000 repeated rows, a few
    hundred KiB on disk, take 200 MB. Checked batch by batch first."""
    import datasets
    import pyarrow.ipc as ipc

    datasets.Dataset.from_dict({"prompt": ["p"], "response": ["r"]}).save_to_disk(str(tmp_path / "ds"))
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    n = 2_000_000
    table = pa.table({"prompt": pa.array(["x" * 100]).take(pa.array(np.zeros(n, np.int64))),
                      "response": pa.array(["r"]).take(pa.array(np.zeros(n, np.int64)))})
    with pa.OSFile(str(arrow), "wb") as out:
        writer = ipc.new_stream(out, table.schema, options=ipc.IpcWriteOptions(compression="zstd"))
        writer.write_table(table, max_chunksize=250_000)
        writer.close()
    assert arrow.stat().st_size < 20_000_000 < table.nbytes
    with pytest.raises(readers.UnreadableSource) as err:
        readers.read_saved_dataset(tmp_path / "ds", max_bytes=50_000_000)
    assert err.value.reason == "too_large_decompressed"
    assert len(readers.read_saved_dataset(tmp_path / "ds", max_bytes=10**9).frame) == n  # under the limit: read


def test_a_row_with_too_many_fields_is_quarantined_fast(tmp_path):
    """One line of 100,000 keys took 19 s (Arrow's type inference, then a 100,000-column frame)."""
    import time

    from tasks.data.scan import MAX_COLUMNS

    wide = {**_rows(1)[0], **{f"k{i}": i for i in range(100_000)}}
    path = _jsonl(tmp_path / "wide.jsonl", [json.dumps(_rows(1)[0]), json.dumps(wide), json.dumps(_rows(1, 7)[0])])
    start = time.perf_counter()
    result = _validate(path, quarantine_max_share=1.0)
    assert time.perf_counter() - start < 10
    assert _reasons(result) == {("wide.jsonl", 2): ["too_many_fields"]} and result.report.rows_valid == 2
    # keys spread over rows: the file's distinct fields are capped, later rows bringing new ones are refused
    many = [json.dumps(_rows(1, i)[0]) if i % 2 else json.dumps({**_rows(1, i)[0], f"extra{i}": 1})
            for i in range(2 * MAX_COLUMNS + 10)]
    result = _validate(_jsonl(tmp_path / "many.jsonl", ["", *many]), quarantine_max_share=1.0)
    extra_rows, room = (len(many) + 1) // 2, MAX_COLUMNS - 4  # 4 fields of every row, then one new per even row
    assert result.report.rows_in == len(many) and result.report.reasons == {"too_many_fields": extra_rows - room}
    pd.DataFrame([[1] * (MAX_COLUMNS + 1)], columns=[f"c{i}" for i in range(MAX_COLUMNS + 1)]).to_csv(
        tmp_path / "wide.csv", index=False)
    assert _reasons(_validate(tmp_path / "wide.csv")) == {("wide.csv", 0): ["too_many_columns"]}


def test_many_distinct_keys_over_many_lines_do_not_stall_the_json_reader(tmp_path):
    """20,000 lines each with a new key: over 10 minutes before (pyarrow's type inference alone,
    64 s, is quadratic in distinct keys). The Arrow path now never infers past the first MiB, so
    the file is read line by line and its fields capped."""
    import time

    from tasks.data.scan import MAX_COLUMNS

    lines = [json.dumps({**_rows(1, i)[0], f"k{i}": 1}) for i in range(20_000)]
    start = time.perf_counter()
    result = _validate(_jsonl(tmp_path / "keys.jsonl", lines), quarantine_max_share=1.0)
    assert time.perf_counter() - start < 20
    assert result.report.rows_in == 20_000
    assert result.report.reasons == {"too_many_fields": 20_000 - (MAX_COLUMNS - 4)}


def test_a_json_array_document_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_rows(200)))
    monkeypatch.setattr(json_reader, "MAX_JSON_ARRAY_BYTES", 1000)
    result = _validate(path, quarantine_max_share=1.0)
    assert _reasons(result) == {("big.json", 0): ["file_too_large"]}
