"""Public layouts, honestly (issue 19, point 5): scores used, no column dropped silently,
quarantine reasons in the file's own column names, column renames on ``alignflow ingest``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from flows.cli import main
from tasks.data.landing import read_and_validate
from tasks.data.report import ingest_command, parse_columns
from tasks.data.settings import IngestSettings, SourceSettings


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _validate(path, **source):
    return read_and_validate([SourceSettings(path=str(path), **source)], IngestSettings(quarantine_max_share=1.0))


def _reasons(result) -> dict[int, list[str]]:
    q = result.quarantine
    return {int(r): list(why) for r, why in zip(q["source_row"], q["reasons"], strict=True)}


def _uf_row(i, score_chosen, score_rejected):
    prompt = f"question {i}"
    chosen = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"good {i}"}]
    rejected = [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"bad {i}"}]
    return {"prompt": prompt, "prompt_id": f"id{i}", "chosen": chosen, "rejected": rejected, "messages": chosen,
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def test_ultrafeedback_binarized_scores_decide_the_choice_and_nothing_is_dropped_silently(tmp_path):
    path = _jsonl(tmp_path / "ufb.jsonl", [_uf_row(0, 8.0, 5.0), _uf_row(1, 7.0, 7.0), _uf_row(2, 3.0, 6.0),
                                          _uf_row(3, "high", 2.0), _uf_row(4, None, 2.0)])
    result = _validate(path)
    assert _reasons(result) == {3: ["chosen_scored_lower:score_chosen"], 4: ["wrong_type:score_chosen"],
                                5: ["missing:score_chosen"]}
    valid = result.valid["pairwise"]
    assert valid["choice"].tolist() == ["a", "tie"]  # equal scores are a tie, not a preference
    assert [json.loads(m) for m in valid["metadata"]] == [
        {"prompt_id": "id0", "score_chosen": 8.0, "score_rejected": 5.0},
        {"prompt_id": "id1", "score_chosen": 7.0, "score_rejected": 7.0}]
    notes = " ".join(result.report.files[0].notes)
    assert "columns not kept: messages" in notes


def test_reasons_name_the_files_own_columns(tmp_path):
    rows = [{"prompt": "p0", "chosen": "good", "rejected": "bad"},
            {"prompt": "p1", "chosen": "good", "rejected": 5},
            {"prompt": "p2", "chosen": "   ", "rejected": "bad"},
            {"prompt": "p3", "chosen": "good", "rejected": None}]
    result = _validate(_jsonl(tmp_path / "pairs.jsonl", rows))
    assert _reasons(result) == {2: ["wrong_type:rejected"], 3: ["blank:chosen"], 4: ["missing:rejected"]}


def test_hh_rows_with_a_missing_or_wrong_side_name_that_side(tmp_path):
    convo = "\n\nHuman: hi there\n\nAssistant: "
    rows = [{"chosen": convo + "hello!", "rejected": convo + "go away"},
            {"chosen": convo + "hello!", "rejected": None},
            {"chosen": 7, "rejected": convo + "go away"}]
    result = _validate(_jsonl(tmp_path / "hh.jsonl", rows))
    assert _reasons(result) == {2: ["missing:rejected"], 3: ["wrong_type:chosen"]}
    assert result.report.rows_valid == 1


def test_renamed_columns_are_named_as_the_file_names_them(tmp_path):
    rows = [{"question": "q0", "good": "a", "bad": "b", "choice": "a", "extra": 1},
            {"question": "  ", "good": "a", "bad": "b", "choice": "a", "extra": 2}]
    path = _jsonl(tmp_path / "renamed.jsonl", rows)
    result = _validate(path, columns={"question": "prompt", "good": "response_a", "bad": "response_b"})
    assert _reasons(result) == {2: ["blank:question"]}
    assert any("columns not kept: extra" in n for n in result.report.files[0].notes)


def test_alignflow_ingest_takes_the_same_column_renames(tmp_path, capsys):
    rows = [{"question": f"q{i}", "response_a": "a", "response_b": "b", "choice": "a"} for i in range(5)]
    path = _jsonl(tmp_path / "renamed.jsonl", rows)
    out = io.StringIO()
    assert ingest_command(str(path), "pairwise", IngestSettings(), stream=out) == 1  # no prompt: all quarantined
    assert "missing:prompt" in out.getvalue()
    out = io.StringIO()
    assert ingest_command(str(path), "pairwise", IngestSettings(), stream=out,
                          columns=parse_columns(["question=prompt"])) == 0
    assert "valid:        5" in out.getvalue()
    home = f"pipeline.home={tmp_path / 'home'}"
    assert main(["ingest", str(path), "--column", "question=prompt", "--set", home]) == 0
    assert main(["ingest", str(path), "--column", "question", "--set", home]) == 2
    assert "SOURCE_COLUMN=FIELD" in capsys.readouterr().out


def test_is_chat_in_a_csv_export_of_public_data(tmp_path):
    frame = pd.DataFrame([{"prompt": "plain", "is_chat": "false", "chosen": "c", "rejected": "r"},
                          {"prompt": json.dumps([{"role": "user", "content": "hi"}]), "is_chat": "true",
                           "chosen": "c", "rejected": "r"}])
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    result = _validate(tmp_path / "pairs.csv")
    assert result.report.rows_valid == 2, _reasons(result)
    assert result.valid["pairwise"]["is_chat"].tolist() == [False, True]
    assert not any("not kept" in n for n in result.report.files[0].notes)
