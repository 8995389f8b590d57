"""Corrupt a share of simulated feedback rows the way real exports go wrong.

Each corruption is one the data layer must quarantine: empty or whitespace-only text, a
missing prompt, control characters, an unparseable timestamp, identical responses, an invalid
choice, a score out of scale, an invalid thumbs label. Reasons that would change a column's
type (a word in a boolean column) are used only in formats that carry mixed types (JSONL, CSV).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

COMMON = ("empty_response", "whitespace_response", "missing_prompt", "control_characters", "bad_timestamp")
REASONS: dict[str, tuple[str, ...]] = {
    "pairwise": (*COMMON, "identical_responses", "invalid_choice"),
    "rating": (*COMMON, "score_out_of_scale"),
    "binary": (*COMMON, "invalid_label"),
}
"""Corruptions that apply to each kind."""

_BAD_TIMESTAMPS = ("yesterday", "2024-13-45T25:61:00Z", "not a date", "31/02/2024 10:00")
_BAD_CHOICES = ("c", "both", "a or b", "2")
_CONTROL = ("\x07", "\x1b", "\x00", "\x08")


def corrupt_rows(
    frame: pd.DataFrame, share: float, scale: tuple[int, int], rng: np.random.Generator
) -> pd.DataFrame:
    """Return a copy of ``frame`` with ``round(share * len)`` rows corrupted, uniformly at random.

    ``frame`` needs ``kind`` and ``format`` columns plus the kinds' fields; the result gains a
    ``malformed`` column (the corruption's name, or None). Raises ValueError on an unknown kind.
    """
    out = frame.copy()
    out["malformed"] = None
    for column in ("choice", "label", "score"):  # corrupted values may not fit the clean dtype
        if column in out:
            out[column] = out[column].astype(object)
    count = int(round(share * len(out)))
    for idx in rng.choice(len(out), size=count, replace=False) if count else []:
        row = out.index[int(idx)]
        kind, fmt = out.at[row, "kind"], out.at[row, "format"]
        if kind not in REASONS:
            raise ValueError(f"row {row}: unknown kind {kind!r}")
        reasons = [r for r in REASONS[kind] if not (r == "invalid_label" and fmt == "parquet")]
        reason = reasons[int(rng.integers(len(reasons)))]
        _apply(out, row, kind, reason, scale, rng)
        out.at[row, "malformed"] = reason
    return out


def _apply(out: pd.DataFrame, row, kind: str, reason: str, scale: tuple[int, int], rng: np.random.Generator) -> None:
    response = "response_a" if kind == "pairwise" and rng.random() < 0.5 else "response"
    if kind == "pairwise" and response == "response":
        response = "response_b"
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    if reason == "empty_response":
        out.at[row, response] = ""
    elif reason == "whitespace_response":
        out.at[row, response] = pick((" ", "\n", " \t "))
    elif reason == "missing_prompt":
        out.at[row, "prompt"] = None
    elif reason == "control_characters":
        text = str(out.at[row, response])
        cut = int(rng.integers(len(text) + 1))
        out.at[row, response] = text[:cut] + pick(_CONTROL) + text[cut:]
    elif reason == "bad_timestamp":
        out.at[row, "created_at"] = pick(_BAD_TIMESTAMPS)
    elif reason == "identical_responses":
        out.at[row, "response_b"] = out.at[row, "response_a"]
    elif reason == "invalid_choice":
        out.at[row, "choice"] = pick(_BAD_CHOICES)
    elif reason == "score_out_of_scale":
        lo, hi = scale
        out.at[row, "score"] = hi + int(rng.integers(1, 5)) if rng.random() < 0.5 else lo - int(rng.integers(1, 3))
    elif reason == "invalid_label":
        out.at[row, "label"] = pick(("maybe", "meh", "2"))
