"""Extra preference pairs for the reward model (``reward.extra_train_paths``): checked before training.

A team's backlog of labelled comparisons (or the demo's offline set, :mod:`tasks.demo.offline_feedback`)
trains the reward model together with the round's own training pairs. The policy's training never
sees it, and the judge's held-out accuracy is still measured on the round's own validation and test
pairs only. Before a round trains on such a file, :func:`check_extra_pairs` reads it in the
builder's pair schema and fails with an error naming the file, the row and the field:

* the file (a Parquet file, or a folder of them) must exist and be readable;
* ``prompt``, ``chosen`` and ``rejected`` are required; ``is_chat`` and ``weight`` are optional;
* ``chosen`` and ``rejected`` are non-empty strings that differ; ``prompt`` is a string (the JSON
  text of a message list when ``is_chat``); ``weight`` is a finite number ≥ 0;
* no prompt may fall in a held-out split: every preference dataset splits by a hash of the
  prompt (:func:`tasks.data.keys.assign_splits` with the pipeline's ``preferences`` split
  settings), so an extra pair whose prompt hashes to ``validation`` or ``test`` would train the
  judge on a prompt it may later be tested on.

The file's content digest (sha256 over its bytes) keys the reward stage's cache and is recorded on
the reward run and the registered reward model, so the same file is the same training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.data.keys import assign_splits, hash64, prompt_keys
from tasks.data.readers import content_digest
from tasks.data.settings import PreferenceSettings

REQUIRED = ("prompt", "chosen", "rejected")
SPLITS = ("train", "validation", "test")
FIELD = "reward.extra_train_paths"


class ExtraPairsError(ValueError):
    """An extra pair file is missing, unreadable, or holds a bad row (the message names file, row, field)."""


@dataclass(frozen=True)
class ExtraPairs:
    """What the reward model trains on besides the round's pairs."""

    paths: tuple[str, ...]
    pairs: int
    """Rows over all files."""
    digest: str
    """:func:`extra_pairs_digest` of the paths."""

    def to_dict(self) -> dict:
        return {**asdict(self), "paths": list(self.paths)}


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise ExtraPairsError(f"{FIELD}: {path}: no such file or folder")
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise ExtraPairsError(f"{FIELD}: {path}: the folder holds no .parquet file")
    return files


def _read(file: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(file)
    except Exception as err:  # noqa: BLE001 - any reader error is the file's problem, named as such
        raise ExtraPairsError(f"{FIELD}: {file}: cannot be read as Parquet ({type(err).__name__}: {err})") from err


def _bad_row(file: Path, row: int, field: str, why: str, value) -> ExtraPairsError:
    shown = repr(value) if not isinstance(value, str) or len(value) < 80 else repr(value[:77] + "...")
    return ExtraPairsError(f"{FIELD}: {file} row {row}: field {field!r} {why}, got {shown}")


def check_rows(frame: pd.DataFrame, file: Path, preferences: PreferenceSettings) -> None:
    """Raise :class:`ExtraPairsError` at the first bad row of ``frame`` (see the module docstring)."""
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise ExtraPairsError(f"{FIELD}: {file}: missing column(s) {missing}; found {sorted(frame.columns)}")
    is_chat = frame["is_chat"] if "is_chat" in frame else pd.Series(False, index=frame.index)
    for i, (prompt, chosen, rejected, chat) in enumerate(zip(frame["prompt"], frame["chosen"], frame["rejected"],
                                                             is_chat, strict=True)):
        if not isinstance(chat, (bool, np.bool_)):
            raise _bad_row(file, i, "is_chat", "must be true or false", chat)
        if not isinstance(prompt, str):
            raise _bad_row(file, i, "prompt", "must be a string", prompt)
        if chat:
            try:
                messages = json.loads(prompt)
            except json.JSONDecodeError:
                messages = None
            if not isinstance(messages, list):
                raise _bad_row(file, i, "prompt", "must be the JSON text of a message list when is_chat", prompt)
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str) or not value.strip():
                raise _bad_row(file, i, field, "must be a non-empty string", value)
        if chosen == rejected:
            raise _bad_row(file, i, "rejected", "must differ from chosen", rejected)
    if "weight" in frame:
        weight = pd.to_numeric(frame["weight"], errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~np.isfinite(weight) | (weight < 0))
        if len(bad):
            i = int(bad[0])
            raise _bad_row(file, i, "weight", "must be a finite number >= 0", frame["weight"].iloc[i])
    splits = preferences.splits
    split = assign_splits(hash64(prompt_keys(frame["prompt"].tolist(), is_chat.to_numpy(bool))),
                          splits.train, splits.validation, preferences.split_salt)
    held = np.flatnonzero(np.asarray(split) != 0)
    if len(held):
        i = int(held[0])
        raise ExtraPairsError(
            f"{FIELD}: {file} row {i}: field 'prompt' falls in the {SPLITS[int(split[i])]} split "
            f"({len(held)} of {len(frame)} rows do; preferences.splits / split_salt hash every prompt to one "
            f"split): a held-out prompt must not train the judge; drop those rows, got {frame['prompt'].iloc[i]!r}")


def extra_pairs_digest(paths: list[str]) -> str:
    """Digest (16 hex) of the contents of every file of ``paths``, in order (the files are not
    checked: this keys the reward stage's cache, :func:`check_extra_pairs` checks them)."""
    sha = hashlib.sha256()
    for path in paths:
        for file in _files(Path(path)):
            sha.update(content_digest(file).encode())
    return sha.hexdigest()[:16]


def check_extra_pairs(paths: list[str], preferences: PreferenceSettings) -> ExtraPairs | None:
    """Check every file of ``paths`` (see the module docstring); None when there are none."""
    if not paths:
        return None
    rows = 0
    for path in paths:
        for file in _files(Path(path)):
            frame = _read(file)
            check_rows(frame, file, preferences)
            rows += len(frame)
    if rows == 0:
        raise ExtraPairsError(f"{FIELD}: {', '.join(paths)}: no rows")
    return ExtraPairs(paths=tuple(paths), pairs=rows, digest=extra_pairs_digest(paths))


def extra_pairs_tags(summary: dict | None) -> dict[str, str]:
    """Registry tags of the other pairs a reward stage recorded in its summary: trained on together
    with the round's (``extra_train``: ``alignflow.reward.extra_*``), or trained on before, by the
    model the stage started from (``warm_start``, the demo's offline reward model:
    ``alignflow.reward.warm_start_*``); none when neither."""
    summary = summary or {}
    tags = {}
    if record := summary.get("extra_train"):
        tags |= {"alignflow.reward.extra_pairs": str(record["pairs"]), "alignflow.reward.extra_digest": record["digest"]}
    if record := summary.get("warm_start"):
        tags |= {"alignflow.reward.warm_start_pairs": str(record["pairs"]),
                 "alignflow.reward.warm_start_digest": record["digest"]}
    return tags


__all__ = ["ExtraPairs", "ExtraPairsError", "check_extra_pairs", "check_rows", "extra_pairs_digest",
           "extra_pairs_tags"]
