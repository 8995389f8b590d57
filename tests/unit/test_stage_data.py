"""Which validated batches a preference build reads."""

from __future__ import annotations

import os

from tasks.stages.data import _validated_digest, selected_files


def _touch(path, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))


def test_recent_batches_keeps_the_newest_batches_across_kinds(tmp_path):
    for kind in ("pairwise", "rating"):
        _touch(tmp_path / kind / "aaa.parquet", 100)
        _touch(tmp_path / kind / "ccc.parquet", 300)
    _touch(tmp_path / "pairwise" / "bbb.parquet", 200)
    every = selected_files(tmp_path, None)
    assert {p.stem for p in every["pairwise"]} == {"aaa", "bbb", "ccc"}
    newest = selected_files(tmp_path, 1)
    assert {k: [p.stem for p in v] for k, v in newest.items()} == {"pairwise": ["ccc"], "rating": ["ccc"]}
    two = selected_files(tmp_path, 2)
    assert {p.stem for p in two["pairwise"]} == {"bbb", "ccc"} and [p.stem for p in two["rating"]] == ["ccc"]
    assert _validated_digest(tmp_path, 1) != _validated_digest(tmp_path, None)
    assert _validated_digest(tmp_path, 1) == _validated_digest(tmp_path, 1)
    # the refused rounds' batches replayed beside the newest (preferences.replay_refused); gone ones skipped
    replay = selected_files(tmp_path, 1, also=["aaa", "gone"])
    assert {k: sorted(p.stem for p in v) for k, v in replay.items()} == {"pairwise": ["aaa", "ccc"],
                                                                          "rating": ["aaa", "ccc"]}
    assert _validated_digest(tmp_path, 1, ["aaa"]) not in (_validated_digest(tmp_path, 1), _validated_digest(tmp_path, None))
