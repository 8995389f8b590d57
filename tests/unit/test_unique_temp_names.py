"""Temporary files have names no other writer uses (issue 14: "temp names are fixed"): a write
never clobbers, nor deletes, another writer's half-written temporary file."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from tasks.data.handoff import open_validated, write_validated
from tasks.demo.simulator import _write


def test_validated_hand_off_leaves_another_writers_temp_file_alone(tmp_path):
    path = tmp_path / "validated" / "pairwise" / "batch.arrow"
    path.parent.mkdir(parents=True)
    other = path.with_name(f".{path.name}.tmp")  # the name every writer used before
    other.write_bytes(b"another writer, half way")
    table = pa.table({"x": [1, 2, 3]})
    write_validated(path, table.schema, [table])
    assert open_validated(path).to_pydict() == {"x": [1, 2, 3]}
    assert other.read_bytes() == b"another writer, half way"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, other.name])


def test_simulated_feedback_leaves_another_writers_temp_file_alone(tmp_path):
    path = tmp_path / "round000-pairwise-000.jsonl"
    other = path.with_name(f".{path.name}.tmp")
    other.write_text("another writer, half way")
    _write(pd.DataFrame({"prompt": ["p"], "response": ["r"]}), path, "jsonl")
    assert pd.read_json(path, lines=True).to_dict("records") == [{"prompt": "p", "response": "r"}]
    assert other.read_text() == "another writer, half way"
