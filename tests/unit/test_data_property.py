"""Property: over messy generated exports, every row ends valid or quarantined (once), counts
reconcile, valid rows satisfy the schema, and the only exception is the threshold error."""

from __future__ import annotations

import json

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.data.landing import read_and_validate
from tasks.data.schemas import schema_model
from tasks.data.settings import IngestSettings, SourceSettings
from tasks.data.validate import QuarantineThresholdExceeded

GOOD_TEXT = st.one_of(st.sampled_from(["good text", "Another  answer", " padded ", "ünïcödé ✓", "line\nbreak"]),
                      st.text(alphabet="abcdefgh \n", min_size=1, max_size=12).filter(str.strip))
BAD_TEXT = st.one_of(
    st.sampled_from(["", "   ", "\t\n", "bell\x07", "x" * 41, "fffd \ufffd", "[{\"role\": \"user\"}]"]),
    st.text(max_size=12), st.none(), st.integers(-3, 3), st.floats(allow_nan=True), st.booleans(),
    st.just([{"role": "user", "content": "hi"}]), st.just([{"role": "x"}]), st.just({"k": 1}),
)


def mostly(good, bad):
    """``good`` about seven times in eight (and when hypothesis simplifies an example)."""
    return st.integers(0, 7).flatmap(lambda i: bad if i == 7 else good)


text = mostly(GOOD_TEXT, BAD_TEXT)
ANY = st.one_of(BAD_TEXT, st.sampled_from(["a", "b", "tie", "x", "up", "down", "true", "0", "3", "9.5"]),
                st.floats(-2, 8), st.integers(-1, 7))


@st.composite
def ranked(draw):
    responses = draw(st.lists(GOOD_TEXT, min_size=2, max_size=4, unique=True))
    return responses, draw(st.permutations(range(len(responses))))


FIELDS = {
    "prompt": text, "response_a": text, "response_b": text, "response": text,
    "choice": mostly(st.sampled_from(["a", "b", "tie", " A ", "TIE"]), ANY),
    "score": mostly(st.one_of(st.integers(1, 5), st.floats(1, 5), st.sampled_from(["2", "4.5"])), ANY),
    "label": mostly(st.sampled_from([True, False, "up", "down", 1, 0, "thumbs_down"]), ANY),
    "annotator_id": mostly(st.sampled_from(["ann1", "ann2", 3]), ANY),
    "created_at": mostly(st.one_of(st.sampled_from(["2025-01-01T00:00:00Z", "2024-06-30 12:00"]),
                                   st.integers(0, 2_000_000_000)),
                         st.one_of(st.none(), st.sampled_from(["2025-02-30", "soon"]), st.floats(allow_nan=True))),
    "metadata": st.one_of(st.none(), text),
}
KIND_FIELDS = {
    "pairwise": ["prompt", "response_a", "response_b", "choice"],
    "rating": ["prompt", "response", "score"],
    "binary": ["prompt", "response", "label"],
    "ranking": ["prompt", "responses", "ranking"],
    "demonstration": ["prompt", "response"],
}


@st.composite
def messy_file(draw):
    kind = draw(st.sampled_from([*KIND_FIELDS, "mixed"]))
    fields = sorted({f for fs in KIND_FIELDS.values() for f in fs}) if kind == "mixed" else KIND_FIELDS[kind]
    fields = [f for f in fields if draw(st.integers(0, 30)) < 30] + ["annotator_id", "created_at", "metadata"]
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 19))
        if choice == 19:
            lines.append('{"prompt": "broken')
        elif choice == 18:
            lines.append("")
        else:
            row = {f: draw(FIELDS[f]) for f in fields if f not in ("responses", "ranking") and draw(st.integers(0, 30)) < 30}
            if "responses" in fields:
                good_lists, row["ranking"] = draw(ranked())
                row["responses"] = draw(mostly(st.just(good_lists), st.one_of(st.lists(text, max_size=3), text)))
                row["ranking"] = draw(mostly(st.just(row["ranking"]), st.one_of(st.lists(st.integers(-1, 3)), text)))
            if kind == "mixed":
                row["kind"] = draw(st.sampled_from([*KIND_FIELDS, "nonsense", None]))
            if row and draw(st.integers(0, 9)) == 9:  # repeat an earlier row
                lines.append(lines[-1] if lines and lines[-1].startswith("{\"") else json.dumps(row))
            else:
                lines.append(json.dumps(row))
    return "\n".join(lines) + ("\n" if lines else "")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=messy_file(), limit=st.floats(0, 1))
def test_every_row_is_accounted_for(tmp_path, content, limit):
    path = tmp_path / "messy.jsonl"
    path.write_text(content)
    cfg = IngestSettings(max_text_chars=40, quarantine_max_share=limit)
    result = read_and_validate([SourceSettings(path=str(path))], cfg)
    rep = result.report
    expected_rows = [i + 1 for i, line in enumerate(content.split("\n")) if line.strip()]
    assert rep.rows_in == len(expected_rows) == rep.rows_valid + rep.rows_quarantined
    seen = list(result.quarantine["source_row"])
    for kind, frame in result.valid.items():
        seen += list(frame["source_row"])
        model = schema_model(kind, cfg.max_text_chars, *map(float, cfg.rating_scale))
        model.validate(frame, lazy=True)  # valid rows really are valid
    assert sorted(seen) == expected_rows  # each input row exactly once
    assert all(len(r) > 0 for r in result.quarantine["reasons"])
    assert sum(rep.reasons.values()) >= rep.rows_quarantined
    try:
        result.raise_if_exceeded()
        assert rep.quarantine_share <= limit
    except QuarantineThresholdExceeded as err:
        assert rep.quarantine_share > limit and f"{rep.rows_quarantined} of {rep.rows_in} rows" in str(err)


def test_reading_the_validated_parquet_back_revalidates_cleanly(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "response": "hello", "score": 4, "created_at": 0},
            {"prompt": "plain", "response": "text", "score": "2.5", "annotator_id": 7}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = read_and_validate([SourceSettings(path=str(tmp_path / "r.jsonl"))], IngestSettings())
    first.valid["rating"].to_parquet(tmp_path / "v.parquet")
    again = read_and_validate([SourceSettings(path=str(tmp_path / "v.parquet"))], IngestSettings())
    cols = ["prompt", "is_chat", "response", "score", "annotator_id", "created_at"]
    pd.testing.assert_frame_equal(first.valid["rating"][cols], again.valid["rating"][cols])
