"""The landing ledger as a round's transaction log: pending until the round ends, torn lines,
files still being written, content recognition, one ledger per pipeline (issues 14 and 19)."""

from __future__ import annotations

import json
import os
import time

import pytest

from tasks.data.landing import (
    CONSUMED,
    FAILED,
    PENDING,
    AlreadyConsumed,
    Ledger,
    LedgerCorrupt,
    ingest,
    ledger_for,
    pending_sources,
)
from tasks.data.settings import IngestSettings
from tasks.data.validate import QuarantineThresholdExceeded


def _rows(n, start=0):
    return [{"prompt": f"p{i}", "response_a": f"a{i}", "response_b": f"b{i}", "choice": "a"}
            for i in range(start, start + n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def landing(tmp_path):
    folder = tmp_path / "landing"
    folder.mkdir()
    return folder


def test_torn_last_line_is_ignored_then_cut_off_and_a_corrupt_middle_line_names_the_ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record([{"digest": "d1", "path": "a", "state": CONSUMED}])
    with ledger.path.open("a") as f:
        f.write('{"digest": "d2", "path": "b", "sta')  # a crash mid-append
    assert [e["digest"] for e in ledger.entries()] == ["d1"]
    ledger.record([{"digest": "d3", "path": "c", "state": CONSUMED}])
    assert [e["digest"] for e in ledger.entries()] == ["d1", "d3"]
    assert all(json.loads(line) for line in ledger.path.read_text().splitlines())
    ledger.path.write_text('{"digest": "d1"}\nnot json\n{"digest": "d3"}\n')
    with pytest.raises(LedgerCorrupt, match=r"ledger .*ledger\.jsonl, line 2"):
        ledger.entries()


def test_pending_files_are_taken_again_until_the_round_settles_them(tmp_path, landing):
    _write(landing / "one.jsonl", _rows(5))
    settings = IngestSettings(landing_dir=str(landing))
    out = tmp_path / "store"
    first = ingest(settings, out, commit=False)  # a round ingests, then crashes before it ends
    assert first.new_data
    again = ingest(settings, out, commit=False)  # the next run retries the same round
    assert again.batch_id == first.batch_id and again.sources == first.sources
    ledger = ledger_for(settings, out)
    assert ledger.digests((PENDING,)) and not ledger.digests((CONSUMED,))
    assert ledger.settle(CONSUMED) == 1 and ledger.settle(CONSUMED) == 0  # idempotent
    assert not ingest(settings, out, commit=False).new_data


def test_a_crashed_rounds_batch_is_replaced_when_new_files_join_it(tmp_path, landing):
    _write(landing / "one.jsonl", _rows(5))
    settings = IngestSettings(landing_dir=str(landing))
    out = tmp_path / "store"
    crashed = ingest(settings, out, commit=False)
    _write(landing / "two.jsonl", _rows(3, start=10))
    retried = ingest(settings, out, commit=False)
    assert retried.batch_id != crashed.batch_id and len(retried.sources) == 2
    names = sorted(p.name for p in (out / "validated" / "pairwise").iterdir())
    assert names == [f"{retried.batch_id}.arrow"]  # no orphan batch counting the same rows twice
    assert not (out / "reports" / f"{crashed.batch_id}.json").exists()


def test_a_changed_file_with_the_same_size_and_mtime_is_recognised_by_content(tmp_path, landing):
    path = landing / "one.jsonl"
    _write(path, _rows(5))
    settings = IngestSettings(landing_dir=str(landing))
    out = tmp_path / "store"
    ingest(settings, out)
    st = path.stat()
    fixed = path.read_text().replace('"choice": "a"', '"choice": "b"', 1)
    assert len(fixed) == st.st_size
    path.write_text(fixed)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a corrected export, same size and mtime
    second = ingest(settings, out)
    assert second.sources == [str(path)]


def test_files_still_being_written_are_left_for_a_later_run(tmp_path, landing):
    settings = IngestSettings(landing_dir=str(landing), landing_quiet_s=60)
    (landing / "export.jsonl.part").write_text(json.dumps(_rows(1)[0]) + "\n")  # write-then-rename
    (landing / ".export.jsonl").write_text(json.dumps(_rows(1)[0]) + "\n")
    growing = landing / "growing.jsonl"
    growing.write_text(json.dumps(_rows(1)[0]) + "\n" + '{"prompt": "p1", "respo')  # mid-write
    half = landing / "half.parquet"
    half.write_bytes(b"PAR1" + b"\0" * 100)  # no footer yet
    done = landing / "done.jsonl"
    _write(done, _rows(2, start=5))
    pending, _ = pending_sources(settings, ledger_for(settings, tmp_path / "store"))
    assert [p.options.path for p in pending] == [str(done)]
    old = time.time() - 120  # quiet for two minutes: taken as it is
    os.utime(growing, (old, old))
    pending, _ = pending_sources(settings, ledger_for(settings, tmp_path / "store"))
    assert sorted(p.options.path for p in pending) == [str(done), str(growing)]


def test_each_pipeline_keeps_its_own_ledger_and_adopts_its_part_of_an_old_shared_one(tmp_path, landing):
    _write(landing / "one.jsonl", _rows(5))
    settings = IngestSettings(landing_dir=str(landing))
    a = ingest(settings, tmp_path / "data" / "a")
    b = ingest(settings, tmp_path / "data" / "b")  # another pipeline reading the same folder
    assert a.new_data and b.new_data
    assert not (landing / ".alignflow-ledger.jsonl").exists()
    # an older version kept one ledger in the landing folder: pipeline a's entries move to a's ledger
    (tmp_path / "data" / "a" / "ledger.jsonl").rename(landing / ".alignflow-ledger.jsonl")
    assert not ingest(settings, tmp_path / "data" / "a").new_data
    c = ingest(settings, tmp_path / "data" / "c")
    assert c.new_data


def test_a_shared_ledger_that_consumed_everything_says_so(tmp_path, landing):
    _write(landing / "one.jsonl", _rows(5))
    shared = str(tmp_path / "shared-ledger.jsonl")
    ingest(IngestSettings(landing_dir=str(landing), ledger_path=shared), tmp_path / "data" / "a")
    with pytest.raises(AlreadyConsumed, match="shared-ledger.jsonl"):
        ingest(IngestSettings(landing_dir=str(landing), ledger_path=shared), tmp_path / "data" / "b")


def test_failed_on_data_is_retried_only_when_the_settings_change(tmp_path, landing):
    rows = _rows(10)
    for r in rows[:3]:
        r["choice"] = "?"
    _write(landing / "bad.jsonl", rows)
    strict = IngestSettings(landing_dir=str(landing), quarantine_max_share=0.1)
    out = tmp_path / "store"
    with pytest.raises(QuarantineThresholdExceeded, match="3 of 10"):
        ingest(strict, out, commit=False)
    assert ledger_for(strict, out).digests((FAILED,))
    assert not ingest(strict, out, commit=False).new_data
    assert ingest(strict.model_copy(update={"quarantine_max_share": 0.5}), out, commit=False).new_data
