"""The five feedback kinds: their fields, kind detection, and pandera schemas of validated rows.

A validated table holds the kind's fields (DESIGN.md, "Data contracts") already typed by
:mod:`tasks.data.coerce`, plus ``is_chat`` (the prompt is the JSON text of a chat message
list), the optional fields (always present, nullable) and lineage (``source_file``,
``source_row``, ``kind``). The pandera models check what a typed row can still get wrong:
missing values, blank or over-long text, control characters, U+FFFD (text decoded from invalid
UTF-8), choices outside ``a``/``b``/``tie``, scores outside the scale, identical responses and
rankings that are not permutations. Check names become quarantine reasons: a column check
``blank`` on ``prompt`` is reported as ``blank:prompt``, a dataframe check by its name.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.compute as pc
from pandera.typing import Series

from tasks.data.keys import rows_with_bytes
from tasks.data.settings import KINDS

REQUIRED: dict[str, tuple[str, ...]] = {
    "pairwise": ("prompt", "response_a", "response_b", "choice"),
    "ranking": ("prompt", "responses", "ranking"),
    "rating": ("prompt", "response", "score"),
    "binary": ("prompt", "response", "label"),
    "demonstration": ("prompt", "response"),
}
"""Required fields of each kind."""
OPTIONAL: tuple[str, ...] = ("annotator_id", "created_at", "source", "conversation_id", "metadata")
"""Optional fields of every kind (present and nullable in validated tables)."""
LINEAGE: tuple[str, ...] = ("source_file", "source_row", "kind")
"""Where a validated or quarantined row came from."""
TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "pairwise": ("prompt", "response_a", "response_b"),
    "ranking": ("prompt",),
    "rating": ("prompt", "response"),
    "binary": ("prompt", "response"),
    "demonstration": ("prompt", "response"),
}
"""Scalar text fields of each kind (text checks apply to each)."""
CHOICES: tuple[str, ...] = ("a", "b", "tie")
"""Valid ``choice`` values (after case and whitespace folding)."""
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
"""C0 control characters other than tab, newline and carriage return, and DEL."""
REPLACEMENT_CHAR = "\ufffd"
"""What invalid UTF-8 bytes decode to; its presence marks text decoded from a broken export."""


def validated_columns(kind: str) -> list[str]:
    """Columns of the validated table of ``kind``, in order."""
    return [*REQUIRED[kind], "is_chat", *OPTIONAL, *LINEAGE]


def detect_kind(columns: list[str] | set[str]) -> str | None:
    """The kind whose required fields are all present; the most specific wins. None if none fits."""
    cols = set(columns)
    for kind in ("pairwise", "ranking", "rating", "binary", "demonstration"):
        if set(REQUIRED[kind]) <= cols:
            return kind
    return None


# --- vectorised checks (pyarrow compute on the string buffers). Nulls pass: ``nullable`` covers them;
# the checks see them (``ignore_na=False``) because pandera's dropna copies a whole text column per check.
def _arrow(s: pd.Series) -> pa_arrow.Array:
    if isinstance(s.dtype, pd.StringDtype) and s.dtype.storage == "pyarrow":
        return pa_arrow.array(s)
    return pa_arrow.array(s.astype("str"))


def _passes(result, s: pd.Series) -> pd.Series:
    return pd.Series(pc.fill_null(result, True).to_numpy(zero_copy_only=False), index=s.index, dtype=bool)


def _not_blank(s: pd.Series) -> pd.Series:
    arr = _arrow(s)  # empty, or only (Unicode) whitespace
    return _passes(pc.invert(pc.or_(pc.equal(pc.binary_length(arr), 0), pc.utf8_is_space(arr))), s)


def _has_control_char(data: np.ndarray) -> np.ndarray:
    cand = np.flatnonzero((data < 32) | (data == 127))  # two fast compares, then the few candidates
    byte = data[cand]
    return cand[(byte != 9) & (byte != 10) & (byte != 13)]  # tab, newline, carriage return are fine


def _has_replacement_char(data: np.ndarray) -> np.ndarray:
    lead = np.flatnonzero(data[:-2] == 0xEF)  # U+FFFD is EF BF BD
    return lead[(data[lead + 1] == 0xBF) & (data[lead + 2] == 0xBD)]


def _no_bytes(s: pd.Series, test) -> pd.Series:
    arr = _arrow(s)  # a null passes, even where its slot spans bytes
    found = rows_with_bytes(arr, test)
    if arr.null_count:
        found &= pc.is_valid(arr).to_numpy(zero_copy_only=False)
    return pd.Series(~found, index=s.index)


def _no_control_chars(s: pd.Series) -> pd.Series:
    return _no_bytes(s, _has_control_char)


def _no_replacement_char(s: pd.Series) -> pd.Series:
    return _no_bytes(s, _has_replacement_char)


def _fits(s: pd.Series, max_chars: int) -> pd.Series:
    arr = _arrow(s)  # a text has at most as many characters as bytes: count only the longer ones
    ok = pc.fill_null(pc.less_equal(pc.binary_length(arr), max_chars), True).to_numpy(zero_copy_only=False)
    longer = np.flatnonzero(~ok)
    if len(longer):
        # filter, not take: a take from a many-chunk column first concatenates all of it
        ok[longer] = pc.less_equal(pc.utf8_length(arr.filter(pa_arrow.array(~ok))), max_chars).to_numpy(
            zero_copy_only=False)
    return pd.Series(ok, index=s.index, dtype=bool)


def _per_list(check, s: pd.Series) -> pd.Series:
    """Apply a string check to every element of a column of lists; a row passes if all do."""
    flat = s.explode()
    flat = flat[flat.notna()].astype("str")
    ok = check(flat).groupby(level=0).all()
    return ok.reindex(s.index, fill_value=True).astype(bool)


def _is_permutation(responses: pd.Series, ranking: pd.Series) -> pd.Series:
    out = [
        resp is None or rank is None or sorted(rank) == list(range(len(resp)))
        for resp, rank in zip(responses, ranking, strict=True)
    ]
    return pd.Series(out, index=responses.index, dtype=bool)


@lru_cache(maxsize=64)
def schema_model(kind: str, max_text_chars: int, scale_min: float, scale_max: float) -> type[pa.DataFrameModel]:
    """The pandera ``DataFrameModel`` of validated ``kind`` rows under these limits (cached).

    Validate with ``model.validate(df, lazy=True)`` on a frame with a 0..n-1 index, so the
    failure cases' ``index`` is the row position. Raises KeyError for an unknown kind.
    """
    text = TEXT_FIELDS[kind]

    class FeedbackRow(pa.DataFrameModel):
        """Fields every kind shares."""

        prompt: Series[str] = pa.Field(nullable=False)
        is_chat: Series[bool] = pa.Field(nullable=False)
        annotator_id: Series[str] = pa.Field(nullable=True)
        created_at: Series[pd.DatetimeTZDtype] = pa.Field(nullable=True, dtype_kwargs={"unit": "us", "tz": "UTC"})
        source: Series[str] = pa.Field(nullable=True)
        conversation_id: Series[str] = pa.Field(nullable=True)
        metadata: Series[str] = pa.Field(nullable=True)

        @pa.check(*text, name="blank", ignore_na=False)
        def blank(cls, s: Series[str]) -> Series[bool]:
            return _not_blank(s)

        @pa.check(*text, name="control_chars", ignore_na=False)
        def control_chars(cls, s: Series[str]) -> Series[bool]:
            return _no_control_chars(s)

        @pa.check(*text, name="invalid_utf8", ignore_na=False)
        def invalid_utf8(cls, s: Series[str]) -> Series[bool]:
            return _no_replacement_char(s)

        @pa.check(*text, name="too_long", ignore_na=False)
        def too_long(cls, s: Series[str]) -> Series[bool]:
            return _fits(s, max_text_chars)

        class Config:
            strict = False
            coerce = False

    if kind == "pairwise":

        class PairwiseRow(FeedbackRow):
            """A choice between two responses."""

            response_a: Series[str] = pa.Field(nullable=False)
            response_b: Series[str] = pa.Field(nullable=False)
            choice: Series[str] = pa.Field(nullable=False)

            @pa.check("choice", name="invalid_value", ignore_na=False)
            def valid_choice(cls, s: Series[str]) -> Series[bool]:
                return s.isin(CHOICES) | s.isna()

            @pa.dataframe_check(name="identical_responses", ignore_na=False)
            def responses_differ(cls, df: pd.DataFrame) -> Series[bool]:
                a, b = df["response_a"], df["response_b"]
                return (a != b).fillna(True) | a.isna() | b.isna()

        return PairwiseRow
    if kind == "ranking":

        class RankingRow(FeedbackRow):
            """An ordered list of responses: ``ranking[0]`` is the index of the best one."""

            responses: Series[object] = pa.Field(nullable=False)
            ranking: Series[object] = pa.Field(nullable=False)

            @pa.check("responses", name="blank")
            def responses_not_blank(cls, s: Series[object]) -> Series[bool]:
                return _per_list(_not_blank, s)

            @pa.check("responses", name="control_chars")
            def responses_no_control(cls, s: Series[object]) -> Series[bool]:
                return _per_list(_no_control_chars, s)

            @pa.check("responses", name="invalid_utf8")
            def responses_utf8(cls, s: Series[object]) -> Series[bool]:
                return _per_list(_no_replacement_char, s)

            @pa.check("responses", name="too_long")
            def responses_fit(cls, s: Series[object]) -> Series[bool]:
                return _per_list(lambda x: _fits(x, max_text_chars), s)

            @pa.check("responses", name="too_few")
            def at_least_two(cls, s: Series[object]) -> Series[bool]:
                return s.map(len) >= 2

            @pa.dataframe_check(name="identical_responses")
            def responses_distinct(cls, df: pd.DataFrame) -> Series[bool]:
                return df["responses"].map(lambda r: r is None or len(set(r)) == len(r)).astype(bool)

            @pa.dataframe_check(name="ranking_not_permutation")
            def ranking_is_permutation(cls, df: pd.DataFrame) -> Series[bool]:
                return _is_permutation(df["responses"], df["ranking"])

        return RankingRow
    if kind == "rating":

        class RatingRow(FeedbackRow):
            """One response with a numeric score on the configured scale."""

            response: Series[str] = pa.Field(nullable=False)
            score: Series[float] = pa.Field(nullable=False)

            @pa.check("score", name="out_of_scale")
            def in_scale(cls, s: Series[float]) -> Series[bool]:
                return (s >= scale_min) & (s <= scale_max)

        return RatingRow
    if kind == "binary":

        class BinaryRow(FeedbackRow):
            """One response with thumbs up (True) or down (False)."""

            response: Series[str] = pa.Field(nullable=False)
            label: Series[bool] = pa.Field(nullable=False)

        return BinaryRow
    if kind == "demonstration":

        class DemonstrationRow(FeedbackRow):
            """A response written or approved by a person."""

            response: Series[str] = pa.Field(nullable=False)

        return DemonstrationRow
    raise KeyError(f"unknown kind {kind!r}; expected one of {KINDS}")
