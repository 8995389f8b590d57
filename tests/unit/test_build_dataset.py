"""Issue 19 (6): ``alignflow build-dataset`` turns public-layout exports into the library's tables
with the pipeline's validation and builder, and exits by the same rules as ``ingest``."""

from __future__ import annotations

import json

import pandas as pd

from flows.cli import main


def _hh(path, rows: int = 60, bad: int = 0):
    lines = [{"chosen": f"\n\nHuman: review film {i}\n\nAssistant: a lovely film",
              "rejected": f"\n\nHuman: review film {i}\n\nAssistant: a dull film"} for i in range(rows)]
    for i in range(bad):
        lines[i]["rejected"] = None
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_build_dataset_writes_the_library_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = _hh(tmp_path / "hh.jsonl", bad=2)
    assert main(["build-dataset", str(export), "--out", str(tmp_path / "tables")]) == 0
    out = capsys.readouterr().out
    assert "rows in 60, valid 58, quarantined 2" in out
    train = pd.read_parquet(tmp_path / "tables" / "pairs-train.parquet")
    assert {"prompt", "is_chat", "chosen", "rejected", "weight"} <= set(train.columns)
    assert len(train) > 0 and (train["chosen"] == "a lovely film").all()
    split_rows = sum(len(pd.read_parquet(tmp_path / "tables" / f"pairs-{s}.parquet"))
                     for s in ("train", "validation", "test"))
    assert split_rows == 58
    assert len(pd.read_parquet(tmp_path / "tables" / "quarantine.parquet")) == 2
    # every call reads its sources again (no ledger to consume them)
    assert main(["build-dataset", str(export), "--out", str(tmp_path / "again")]) == 0


def test_build_dataset_exit_codes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["build-dataset", str(_hh(tmp_path / "bad.jsonl", bad=20)), "--out", str(tmp_path / "t")]) == 1
    assert "data.quarantine_max_share" in capsys.readouterr().out
    assert main(["build-dataset", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t")]) == 2


def test_build_dataset_takes_an_ultrafeedback_binarized_export(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = []
    for i in range(40):
        prompt = f"Review film {i}"
        rows.append({"prompt": prompt, "prompt_id": f"id{i}",
                     "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "a lovely film"}],
                     "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "a dull film"}],
                     "messages": [{"role": "user", "content": prompt}], "score_chosen": 8.0, "score_rejected": 3.0})
    export = tmp_path / "ultrafeedback.jsonl"
    export.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["build-dataset", str(export), "--out", str(tmp_path / "tables")]) == 0
    pairs = pd.read_parquet(tmp_path / "tables" / "pairs.parquet")
    assert len(pairs) == 40 and (pairs["chosen"] == "a lovely film").all() and (pairs["rejected"] == "a dull film").all()
