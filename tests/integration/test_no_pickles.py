"""No code from data: cached stages persist JSON records, and a planted or rewritten cache entry
(a pickle, a record naming a foreign class) is never loaded — under the real Prefect engine.

Prefect's default result serializer is cloudpickle and it loads whatever serializer a stored
record names, so whoever could write to ``<PREFECT_HOME>/storage`` ran code in the next flow run.
"""

from __future__ import annotations

import base64
import json
import os

import cloudpickle
import pytest
from prefect import flow
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

from tasks.records import ModelRecord
from tasks.results import SERIALIZER_TYPE, pickles_under
from tasks.stages.cached import cached_stage

pytestmark = pytest.mark.integration
CALLS: list[str] = []


def _make(name: str) -> ModelRecord:
    CALLS.append(name)
    return ModelRecord(stage="dpo", path=f"/models/{name}", digest=name, summary={"loss": 0.25, "steps": 3})


make_record = cached_stage("no-pickles-test", key=lambda name, **_: name)(_make)


@flow(name="no-pickles-test")
def _one(name: str):
    state = make_record(name=name, return_state=True)
    return state.name, state.result()


class _Marker:
    """Unpickling this touches a file: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def storage(prefect_harness, tmp_path):
    folder = tmp_path / "storage"
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: folder}):
        yield folder


def test_cached_stage_persists_json_records_and_a_cache_hit_loads_them(storage):
    CALLS.clear()
    first = _one("a")
    second = _one("a")
    assert first[0] == "Completed" and second[0] == "Cached" and CALLS == ["a"]
    assert second[1] == first[1] and isinstance(second[1], ModelRecord)
    assert pickles_under(storage) == []
    [entry] = list((storage / "keys").iterdir())
    meta = json.loads(entry.read_text())
    assert meta["serializer"]["type"] == SERIALIZER_TYPE
    result = json.loads((storage / entry.name).read_text())
    assert result["__class__"] == "tasks.records.ModelRecord" and result["data"]["summary"]["loss"] == 0.25


def test_a_planted_pickle_entry_is_a_cache_miss_and_is_never_unpickled(storage, tmp_path):
    CALLS.clear()
    _one("b")
    [entry] = list((storage / "keys").iterdir())
    marker = tmp_path / "unpickled"
    meta = json.loads(entry.read_text())
    meta["serializer"] = {"type": "pickle", "picklelib": "cloudpickle"}
    entry.write_text(json.dumps(meta))
    (storage / entry.name).write_bytes(base64.encodebytes(cloudpickle.dumps(_Marker(str(marker)))))
    state, record = _one("b")
    assert not marker.exists(), "a planted pickle was loaded"
    assert state == "Completed" and CALLS == ["b", "b"] and record.path == "/models/b"
    assert pickles_under(storage) == [], "the re-run overwrote the planted entry"
    assert _one("b")[0] == "Cached"


def test_a_record_naming_a_foreign_class_is_a_cache_miss(storage, tmp_path):
    CALLS.clear()
    _one("c")
    [entry] = list((storage / "keys").iterdir())
    marker = tmp_path / "popen-ran"
    (storage / entry.name).write_text(json.dumps({"__class__": "subprocess.Popen",
                                                  "data": ["touch", str(marker)]}))
    state, record = _one("c")
    assert state == "Completed" and CALLS == ["c", "c"] and record.digest == "c"
    assert not marker.exists()
    assert os.path.exists(storage / entry.name)
