"""Landing folder and ledger; the ``alignflow ingest`` helper's report and exit codes."""

from __future__ import annotations

import io
import json
import os

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.data.handoff import read_validated_frame
from tasks.data.landing import Ledger, ingest
from tasks.data.report import ingest_command
from tasks.data.settings import IngestSettings, SourceSettings
from tasks.data.validate import QuarantineThresholdExceeded


def _pairwise(n, start=0, bad=0):
    rows = [{"prompt": f"p{i}", "response_a": f"a{i}", "response_b": f"b{i}", "choice": "a"} for i in range(start, start + n)]
    for i in range(bad):
        rows[i]["choice"] = "?"
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_each_landing_file_is_ingested_once(tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "store"
    landing.mkdir()
    _write(landing / "one.jsonl", _pairwise(5))
    pd.DataFrame(_pairwise(3, start=10)).to_csv(landing / "two.csv", index=False)
    settings = IngestSettings(landing_dir=str(landing))
    first = ingest(settings, out)
    assert first.new_data and first.report["rows_in"] == 8 and len(first.sources) == 2
    assert len(read_validated_frame(first.validated["pairwise"])) == 8
    second = ingest(settings, out)
    assert not second.new_data and second.sources == [] and sorted(second.skipped) == sorted(first.sources)
    assert len(list((out / "validated" / "pairwise").glob("*.arrow"))) == 1
    _write(landing / "three.jsonl", _pairwise(2, start=20))
    third = ingest(settings, out)
    assert third.sources == [str(landing / "three.jsonl")] and third.report["rows_in"] == 2
    _write(landing / "one.jsonl", _pairwise(6))  # changed content counts as new
    fourth = ingest(settings, out)
    assert fourth.sources == [str(landing / "one.jsonl")]
    assert len(Ledger(out / "ledger.jsonl").entries()) == 4
    assert not ingest(settings, out).new_data
    os.utime(landing / "three.jsonl", ns=(1, 1))  # touched, same content: hashed, then skipped
    assert not ingest(settings, out).new_data
    (landing / "sub").mkdir()
    (landing / "three.jsonl").rename(landing / "sub" / "moved.jsonl")  # moved: same digest
    assert not ingest(settings, out).new_data


def test_over_threshold_writes_quarantine_and_commits_nothing(tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "store"
    landing.mkdir()
    _write(landing / "bad.jsonl", _pairwise(10, bad=3))
    settings = IngestSettings(landing_dir=str(landing), quarantine_max_share=0.2)
    with pytest.raises(QuarantineThresholdExceeded, match="3 of 10 rows") as err:
        ingest(settings, out)
    q = pq.read_table(err.value.quarantine_path).to_pandas()
    assert len(q) == 3 and set(q["source_row"]) == {1, 2, 3}
    assert not (out / "validated").exists()
    assert {e["state"] for e in Ledger(out / "ledger.jsonl").entries()} == {"failed"}  # failed on its data
    assert not ingest(settings, out).new_data  # not retried while the settings that refused it stay
    report = json.loads(next((out / "reports").glob("*.json")).read_text())
    assert report["rows_quarantined"] == 3 and report["reasons"] == {"invalid_value:choice": 3}
    ok = ingest(settings.model_copy(update={"quarantine_max_share": 0.5}), out)  # retried after raising the limit
    assert ok.report["rows_valid"] == 7


def test_explicit_sources_and_identical_copies(tmp_path):
    data = tmp_path / "exports"
    data.mkdir()
    _write(data / "a.jsonl", _pairwise(4))
    _write(data / "copy.jsonl", _pairwise(4))
    settings = IngestSettings(sources=[SourceSettings(path=str(data), kind="pairwise")],
                              ledger_path=str(tmp_path / "ledger.jsonl"))
    res = ingest(settings, tmp_path / "store")
    assert res.sources == [str(data / "a.jsonl")] and res.skipped == [str(data / "copy.jsonl")]
    assert not ingest(settings, tmp_path / "store").new_data


def test_ingest_command_prints_counts_and_exits_nonzero_past_threshold(tmp_path):
    _write(tmp_path / "f.jsonl", _pairwise(10, bad=2) + [{"prompt": "", "response_a": "x", "response_b": "y", "choice": "b"}])
    out = io.StringIO()
    code = ingest_command(str(tmp_path / "f.jsonl"), None, IngestSettings(quarantine_max_share=0.5), stream=out)
    text = out.getvalue()
    assert code == 0 and "rows in:      11" in text and "quarantined:  3" in text
    assert "2  invalid_value:choice" in text and "1  blank:prompt" in text
    out = io.StringIO()
    code = ingest_command(str(tmp_path / "f.jsonl"), "pairwise", IngestSettings(quarantine_max_share=0.1),
                          out_dir=tmp_path / "check", stream=out)
    assert code == 1 and "FAILED: 3 of 11 rows quarantined" in out.getvalue()
    assert len(pd.read_parquet(tmp_path / "check" / "quarantine.parquet")) == 3
    out = io.StringIO()
    assert ingest_command(str(tmp_path / "missing.jsonl"), None, IngestSettings(), stream=out) == 2
    assert "cannot read" in out.getvalue()
    out = io.StringIO()
    assert ingest_command(str(tmp_path / "f.jsonl"), "rating", IngestSettings(), stream=out) == 1
    assert "missing:response" in out.getvalue()
