"""The JSON record format of cached task results (tasks/results.py), without a Prefect server:
the records stages return round-trip, and nothing but alignflow's own records is ever rebuilt."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import cloudpickle
import pytest
from prefect.serializers import PickleSerializer

from tasks.records import ModelRecord, StageTiming
from tasks.results import RECORDS, UnsafeRecordError, check_cache_entry, pickles_under


def test_stage_records_round_trip_through_json():
    record = ModelRecord(stage="dpo", path="/m", digest="d", summary={"metrics": {"loss": float("nan"), "n": 3}})
    back = RECORDS.loads(RECORDS.dumps(record))
    assert isinstance(back, ModelRecord) and back.digest == "d" and math.isnan(back.summary["metrics"]["loss"])
    pair = RECORDS.loads(RECORDS.dumps([StageTiming(stage="s", status="ran", seconds=1.5), Path("/x")]))
    assert pair == [StageTiming(stage="s", status="ran", seconds=1.5), Path("/x")]
    assert isinstance(RECORDS.loads(RECORDS.dumps(ValueError("bad"))), ValueError)


@pytest.mark.parametrize("name", ["subprocess.Popen", "os.system", "builtins.eval",
                                  "tasks.results.RecordKeys", "not_imported_module.Thing"])
def test_a_record_cannot_rebuild_anything_else(name):
    with pytest.raises(UnsafeRecordError, match=name):
        RECORDS.loads(json.dumps({"__class__": name, "data": ["touch", "/tmp/x"]}).encode())


def test_exceptions_of_other_modules_come_back_as_runtime_errors():
    back = RECORDS.loads(json.dumps({"__exc_type__": "subprocess.CalledProcessError", "message": "m"}).encode())
    assert type(back) is RuntimeError


def _entry(serializer: dict, **extra) -> bytes:
    return json.dumps({"storage_key": "k", "serializer": serializer, "storage_block_id": None, **extra}).encode()


def test_cache_entries_naming_another_serializer_or_a_block_are_refused(tmp_path):
    with pytest.raises(UnsafeRecordError, match="'pickle' refused"):
        check_cache_entry(_entry({"type": "pickle", "picklelib": "cloudpickle"}))
    with pytest.raises(UnsafeRecordError, match="'json' refused"):
        check_cache_entry(_entry({"type": "json", "object_decoder": "os.system"}))
    with pytest.raises(UnsafeRecordError, match="storage block"):
        check_cache_entry(_entry({"type": "alignflow-json"}, storage_block_id="6f1c1a2e-0000-0000-0000-000000000000"))
    with pytest.raises(UnsafeRecordError, match="not a JSON cache entry"):
        check_cache_entry(b"\x80\x05\x95 pickle bytes")
    with pytest.raises(ValueError, match="outside of the base path"):
        check_cache_entry(_entry({"type": "alignflow-json"}, storage_key="/etc/passwd"), result_base=tmp_path)
    (tmp_path / "k").write_bytes(RECORDS.dumps(ModelRecord(stage="s", path="/p", digest="d")))
    assert check_cache_entry(_entry({"type": "alignflow-json"}), result_base=tmp_path)


def test_pickles_under_finds_raw_and_prefect_wrapped_pickles(tmp_path):
    (tmp_path / "raw").write_bytes(cloudpickle.dumps({"a": 1}))
    (tmp_path / "prefect").write_text(json.dumps({
        "metadata": {"serializer": {"type": "pickle"}},
        "result": base64.encodebytes(PickleSerializer().dumps({"a": 1})).decode()}))
    (tmp_path / "ok").write_bytes(RECORDS.dumps(ModelRecord(stage="s", path="/p", digest="d")))
    assert [p.name for p in pickles_under(tmp_path)] == ["prefect", "raw"]
