"""Validation: each kind of bad row is quarantined with the right reason; good rows pass untouched."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.data.landing import read_and_validate
from tasks.data.readers import read_csv, read_jsonl, read_source
from tasks.data.settings import IngestSettings, SourceSettings
from tasks.data.validate import QuarantineThresholdExceeded, validate_tables

GOOD = {"prompt": "How was the film?", "response_a": "Wonderful.", "response_b": "Dull.", "choice": "a",
        "annotator_id": "ann-1", "created_at": "2025-01-01T10:00:00Z"}
SETTINGS = IngestSettings(max_text_chars=50, rating_scale=(1, 5), quarantine_max_share=1.0)


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


def _validate(path, settings=SETTINGS, **opts):
    return read_and_validate([SourceSettings(path=str(path), **opts)], settings)


def _reasons_by_row(result):
    return {int(r): list(x) for r, x in zip(result.quarantine["source_row"], result.quarantine["reasons"], strict=True)}


def _good(i, **change):
    return {**GOOD, "prompt": f"{GOOD['prompt']} #{i}", **change}


BAD_PAIRWISE = [
    ({"prompt": None}, "missing:prompt"),
    ({"prompt": ""}, "blank:prompt"),
    ({"prompt": " \t\n "}, "blank:prompt"),
    ({"response_b": "Wonderful."}, "identical_responses"),
    ({"choice": "c"}, "invalid_value:choice"),
    ({"choice": 3}, "invalid_value:choice"),
    ({"prompt": 17}, "wrong_type:prompt"),
    ({"response_a": "x" * 51}, "too_long:response_a"),
    ({"response_a": "bell\x07"}, "control_chars:response_a"),
    ({"response_b": "lone \ud800 surrogate"}, "invalid_utf8:response_b"),
    ({"created_at": "last tuesday"}, "unparseable_timestamp:created_at"),
    ({"annotator_id": {"id": 1}}, "wrong_type:annotator_id"),
    ({"prompt": [{"role": "wizard", "content": "hi"}]}, "bad_chat:prompt"),
]


def test_each_bad_pairwise_row_has_its_reason_and_good_rows_pass_untouched(tmp_path):
    rows = [_good(i) for i in range(5)]
    expected = {}
    for change, reason in BAD_PAIRWISE:
        expected[len(rows) + 1] = reason
        rows.append(_good(len(rows), **change))
    rows.append(dict(rows[0]))  # an exact duplicate of line 1
    expected[len(rows)] = "duplicate_row"
    rows.append(_good(len(rows), prompt=[{"role": "user", "content": "chat  prompt"}]))  # a good chat prompt
    path = _write_jsonl(tmp_path / "f.jsonl", rows, extra_lines=['{"prompt": "broken'])
    expected[len(rows) + 1] = "malformed_json"
    result = _validate(path)
    got = _reasons_by_row(result)
    assert {row: reasons for row, reasons in got.items()} == {row: [reason] for row, reason in expected.items()}
    rep = result.report
    assert rep.rows_in == len(rows) + 1 == rep.rows_valid + rep.rows_quarantined
    valid = result.valid["pairwise"]
    assert list(valid["source_row"]) == [1, 2, 3, 4, 5, len(rows)]
    for i in range(5):  # text, choice and ids exactly as given
        row = valid.iloc[i]
        assert row["prompt"] == rows[i]["prompt"] and row["response_a"] == GOOD["response_a"]
        assert row["choice"] == "a" and row["annotator_id"] == "ann-1" and not row["is_chat"]
        assert row["created_at"] == pd.Timestamp("2025-01-01T10:00:00Z")
    chat = valid.iloc[5]
    assert chat["is_chat"] and json.loads(chat["prompt"]) == [{"role": "user", "content": "chat  prompt"}]
    raw = json.loads(result.quarantine.set_index("source_row").loc[6, "raw"])
    assert raw["prompt"] is None and raw["choice"] == "a"


def test_a_row_gets_every_reason_and_missing_yields_to_sharper_reasons(tmp_path):
    path = _write_jsonl(tmp_path / "f.jsonl", [
        _good(0, prompt="  ", choice="z", created_at="nope", response_a="same", response_b="same"),
        _good(1, prompt=3.5),
    ])
    got = _reasons_by_row(_validate(path))
    assert got[1] == ["blank:prompt", "identical_responses", "invalid_value:choice", "unparseable_timestamp:created_at"]
    assert got[2] == ["wrong_type:prompt"]  # not also missing:prompt


def test_other_kinds_bad_rows(tmp_path):
    rating = pd.DataFrame({"prompt": ["p1", "p2", "p3", "p4", "p5"], "response": ["r", "r", "r", "r", "r"],
                           "score": ["4", "9", "abc", "1.5", None]})
    rating.to_csv(tmp_path / "rating.csv", index=False)
    got = _reasons_by_row(_validate(tmp_path / "rating.csv"))
    assert got == {3: ["out_of_scale:score"], 4: ["wrong_type:score"], 6: ["missing:score"]}

    binary = [{"prompt": "p", "response": f"r{i}", "label": lab} for i, lab in
              enumerate([True, "thumbs_down", 1, "maybe", None, -1])]
    res = _validate(_write_jsonl(tmp_path / "binary.jsonl", binary))
    assert _reasons_by_row(res) == {4: ["invalid_value:label"], 5: ["missing:label"]}
    assert list(res.valid["binary"]["label"]) == [True, False, True, False]

    ranking = [{"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
               {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]},
               {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1, 2]},
               {"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]},
               {"prompt": "p", "responses": ["a", " "], "ranking": [1, 0]},
               {"prompt": "p", "responses": "not a list", "ranking": [0]}]
    got = _reasons_by_row(_validate(_write_jsonl(tmp_path / "ranking.jsonl", ranking)))
    assert got == {2: ["ranking_not_permutation"], 3: ["ranking_not_permutation"], 4: ["identical_responses"],
                   5: ["blank:responses"], 6: ["wrong_type:responses"]}

    demos = [{"prompt": "p", "response": "fine", "kind": "demonstration"},
             {"prompt": "p", "response": "x", "kind": "demonstartion"}]
    got = _reasons_by_row(_validate(_write_jsonl(tmp_path / "mixed.jsonl", demos)))
    assert got == {2: ["unknown_kind"]}



@pytest.mark.filterwarnings("error")
def test_a_file_with_no_valid_thumb_or_flag_is_quarantined_row_by_row(tmp_path):
    # Every label and is_chat invalid: the mapped column is all NaN (float), which pandas 4 will not fill with a bool
    binary = pd.DataFrame({"prompt": ["p1", "p2"], "response": ["r1", "r2"], "label": ["maybe", "sideways"],
                           "is_chat": ["perhaps", "unsure"]})
    binary.to_csv(tmp_path / "binary.csv", index=False)
    res = _validate(tmp_path / "binary.csv")
    assert _reasons_by_row(res) == {2: ["invalid_value:is_chat", "invalid_value:label"],
                                    3: ["invalid_value:is_chat", "invalid_value:label"]}

def test_undetectable_kind_and_disallowed_kind_are_quarantined(tmp_path):
    path = _write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "a"}] * 3)
    res = _validate(path)
    assert res.report.rows_quarantined == 3 and res.report.reasons == {"unknown_kind": 3}
    assert "could not detect the kind" in res.report.files[0].notes[0]
    res = _validate(_write_jsonl(tmp_path / "g.jsonl", [_good(0)]), IngestSettings(kinds=["rating"], quarantine_max_share=1))
    assert res.report.reasons == {"kind_not_allowed": 1}


def test_csv_reader_quarantines_malformed_records_and_invalid_utf8(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b'prompt,response_a,response_b,choice\n'
                     b'"Q1","multi\nline",B,a\n'
                     b'Q2,A,B,b,EXTRA\n'
                     b'Q3,"bad \xff byte",B,tie\n'
                     b'Q4,A,B,a\n')
    table = read_csv(path)
    assert list(table.rows) == [2, 4, 5] and table.errors[0][:2] == (3, "malformed_csv_row")
    res = _validate(path)
    assert _reasons_by_row(res) == {3: ["malformed_csv_row"], 4: ["invalid_utf8:response_a"]}
    assert res.valid["pairwise"]["response_a"].tolist() == ["multi\nline", "A"]


def test_jsonl_reader_keeps_line_numbers_across_blank_lines_and_non_objects(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(_good(0)) + "\n\n" + "[1, 2]\n" + json.dumps(_good(1)) + "\n")
    table = read_jsonl(path)
    assert list(table.rows) == [1, 4] and table.errors == [(3, "not_an_object", '"[1, 2]"')]
    path.write_text(json.dumps(_good(0)) + "\n\n" + json.dumps(_good(1)) + "\n")  # fast path
    assert list(read_jsonl(path).rows) == [1, 3]


def test_parquet_and_saved_dataset_sources(tmp_path):
    import datasets

    frame = pd.DataFrame([_good(i) for i in range(4)])
    frame.loc[2, "choice"] = "nope"
    frame.to_parquet(tmp_path / "f.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "ds"))
    for src in (tmp_path / "f.parquet", tmp_path / "ds"):
        res = _validate(src)
        assert _reasons_by_row(res) == {3: ["invalid_value:choice"]} and res.report.rows_valid == 3
    assert read_source(tmp_path / "ds").digest is not None


def test_threshold_error_names_counts_and_reasons(tmp_path):
    rows = [_good(i) for i in range(8)] + [_good(8, choice="x"), _good(9, prompt="")]
    res = _validate(_write_jsonl(tmp_path / "f.jsonl", rows), IngestSettings(quarantine_max_share=0.1))
    assert res.report.exceeded
    with pytest.raises(QuarantineThresholdExceeded) as err:
        res.raise_if_exceeded("/q.parquet")
    msg = str(err.value)
    assert "2 of 10 rows (20.00%)" in msg and "10.00%" in msg and "blank:prompt: 1" in msg and "/q.parquet" in msg
    _validate(_write_jsonl(tmp_path / "g.jsonl", rows[:9]), IngestSettings(quarantine_max_share=0.12)).raise_if_exceeded()


def test_duplicates_across_files_keep_the_first_copy(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [_good(0), _good(1)])
    b = _write_jsonl(tmp_path / "b.jsonl", [_good(1), _good(2)])
    res = validate_tables([(read_source(a), SourceSettings(path=str(a))), (read_source(b), SourceSettings(path=str(b)))],
                          SETTINGS)
    q = res.quarantine
    assert len(q) == 1 and q["source_file"].iloc[0] == str(b) and q["source_row"].iloc[0] == 1
    assert [f.rows_quarantined for f in res.report.files] == [0, 1]
    keep = validate_tables([(read_source(a), SourceSettings(path=str(a))), (read_source(b), SourceSettings(path=str(b)))],
                           SETTINGS.model_copy(update={"duplicates": "keep"}))
    assert keep.report.rows_quarantined == 0


def test_require_timestamp_and_epoch_timestamps(tmp_path):
    rows = [_good(0, created_at=1735725600), _good(1, created_at=None)]
    res = _validate(_write_jsonl(tmp_path / "f.jsonl", rows), SETTINGS.model_copy(update={"require_timestamp": True}))
    assert _reasons_by_row(res) == {2: ["missing:created_at"]}
    assert res.valid["pairwise"]["created_at"].iloc[0] == pd.Timestamp("2025-01-01T10:00:00Z")


def test_quarantine_parquet_columns(tmp_path):
    from tasks.data.landing import write_quarantine

    res = _validate(_write_jsonl(tmp_path / "f.jsonl", [_good(0), _good(1, choice="q")]))
    table = pq.read_table(write_quarantine(res, tmp_path / "q.parquet"))
    assert table.column_names == ["source_file", "source_row", "kind", "reasons", "raw"]
    assert table.to_pylist()[0]["reasons"] == ["invalid_value:choice"]
    assert np.issubdtype(table.column("source_row").to_numpy().dtype, np.integer)


def test_jsonl_with_invalid_utf8_bytes_keeps_the_fast_path_and_names_the_field(tmp_path, monkeypatch):
    from tasks.data import json_reader
    from tasks.data.scan import scan_text

    def no_fallback(*args):
        raise AssertionError("line-by-line path taken")

    lines = [json.dumps(_good(i)).encode() for i in range(50)]
    lines[7] = lines[7].replace(b"Wonderful.", b"Wonder\xff\xfeful.")
    lines[31] = lines[31].replace(b"Dull.", b"Du\xc3ll.")
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    scan = scan_text(path, block=256)  # tiny blocks: sequences and lines cross block boundaries
    assert scan.lines == 50 and list(scan.bad_lines) == [7, 31] and not scan.blank_lines
    assert [path.read_bytes()[s:e] for s, e in scan.bad_spans] == [lines[7], lines[31]]
    monkeypatch.setattr(json_reader, "_read_lines", no_fallback)
    table = read_jsonl(path)
    assert not table.errors and list(table.rows) == list(range(1, 51))
    res = _validate(path)
    assert _reasons_by_row(res) == {8: ["invalid_utf8:response_a"], 32: ["invalid_utf8:response_b"]}
    assert json.loads(res.quarantine["raw"].iloc[0])["response_a"] == "Wonder\ufffd\ufffdful."
    assert (res.valid["pairwise"]["response_a"] == "Wonderful.").all()
