"""Type raw columns into a kind's fields, recording a reason for every value that does not fit.

Values are never repaired: a value of the wrong type becomes missing in the typed frame and its
row gets ``wrong_type:<field>`` (or ``invalid_value:<field>``, ``unparseable_timestamp:<field>``,
``bad_chat:<field>``), so validation quarantines it. What *is* normalised, because it is notation
rather than content: ``choice`` case and surrounding whitespace; thumbs labels written as
true/false, 1/0/-1, yes/no, up/down; ids written as integers; timestamps (to UTC, microseconds);
chat prompts (to the JSON text of their role/content messages, with ``is_chat`` true). Text
is kept exactly as given.

Work is vectorised over columns; Python loops run only over values that are not plain strings
(chat lists, list fields, mixed-type columns).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tasks.data.schemas import CONTROL_CHARS, OPTIONAL, REQUIRED
from tasks.data.settings import IngestSettings

LABELS = {"true": True, "1": True, "1.0": True, "+1": True, "yes": True, "up": True, "thumbs_up": True,
          "false": False, "0": False, "0.0": False, "-1": False, "-1.0": False, "no": False, "down": False,
          "thumbs_down": False}
"""Spellings of thumbs up/down accepted in ``label`` (case and whitespace folded)."""
_CHAT_LIKE = r'^\s*\[\s*\{\s*"'
_CONTROL_RE = re.compile(CONTROL_CHARS)
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class Problems:
    """Reasons attached to row positions, collected as arrays (cheap when there are few)."""

    def __init__(self) -> None:
        self._pos: list[np.ndarray] = []
        self._reason: list[np.ndarray] = []

    def add(self, where: np.ndarray | pd.Series | Iterable[int], reason: str) -> None:
        """Attach ``reason`` to the rows of a boolean mask or an array of positions."""
        arr = np.asarray(where)
        pos = np.flatnonzero(arr) if arr.dtype == bool else arr.astype(np.int64, copy=False)
        if len(pos):
            self._pos.append(pos)
            self._reason.append(np.full(len(pos), reason, dtype=object))

    def extend(self, other: Problems, offset: int = 0) -> None:
        """Take another collection's reasons, shifting its positions by ``offset``."""
        self._pos.extend(p + offset for p in other._pos)
        self._reason.extend(other._reason)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions, reasons), unsorted, possibly repeated."""
        if not self._pos:
            return np.zeros(0, np.int64), np.zeros(0, object)
        return np.concatenate(self._pos), np.concatenate(self._reason)

    def __bool__(self) -> bool:
        return bool(self._pos)


def _null_text(n: int) -> pd.Series:
    # from an Arrow null array: the same str column as pd.Series([None] * n, dtype="str"), ~100x faster
    return pd.Series(pa.nulls(n, pa.large_string()), dtype="str")


def _is_stringy(col: pd.Series) -> bool:
    return isinstance(col.dtype, pd.StringDtype) or (
        col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) in ("string", "empty"))


def _object_strings(col: pd.Series, name: str, problems: Problems) -> pd.Series:
    """An object column of str/None as a string column; lone surrogates become U+FFFD (so the
    text check reports ``invalid_utf8``), since they cannot be stored as UTF-8."""
    bad = col.map(lambda v: isinstance(v, str) and _SURROGATE_RE.search(v) is not None).to_numpy(bool)
    if bad.any():
        col = col.copy()
        col[bad] = col[bad].map(lambda v: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    return col.astype("str")


def chat_json(value, roles: set[str]) -> tuple[str | None, str | None]:
    """(canonical JSON text, None) for a valid chat message list, else (None, reason).

    Valid: a non-empty list of mappings with ``role`` in ``roles`` and non-blank string
    ``content`` without control characters; other keys are dropped.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        return None, "bad_chat"
    out = []
    for msg in value:
        if not isinstance(msg, dict) or msg.get("role") not in roles or not isinstance(msg.get("content"), str):
            return None, "bad_chat"
        if not msg["content"].strip():
            return None, "blank"
        if _CONTROL_RE.search(msg["content"]):
            return None, "control_chars"
        out.append({"role": msg["role"], "content": msg["content"]})
    return json.dumps(out, ensure_ascii=False), None


def coerce_text(col: pd.Series, name: str, problems: Problems, *, chat_roles: set[str] | None = None,
                is_chat_hint: pd.Series | None = None) -> tuple[pd.Series, np.ndarray]:
    """A text field as a string column, and whether each row is a chat prompt.

    ``chat_roles`` set: lists of messages (and strings holding their JSON, or strings marked by
    ``is_chat_hint``) become chat prompts. Other non-strings: ``wrong_type:<name>``.
    """
    n = len(col)
    is_chat = np.zeros(n, bool)
    if _is_stringy(col):
        text = col.astype("str") if isinstance(col.dtype, pd.StringDtype) else _object_strings(col, name, problems)
        chat_values = None
    elif col.dtype == object:
        kinds = col.map(lambda v: 2 if isinstance(v, str) else 1 if isinstance(v, (list, tuple, np.ndarray)) else 0)
        kinds = kinds.to_numpy(np.int8)
        na = col.isna().to_numpy(bool) & (kinds == 0)
        is_list = kinds == 1
        wrong = (kinds == 0) & ~na
        if chat_roles is None:
            wrong |= is_list
        problems.add(wrong, f"wrong_type:{name}")
        text = _object_strings(col.where(kinds == 2, None), name, problems)
        chat_values = np.flatnonzero(is_list) if chat_roles is not None else None
    else:  # numbers, booleans, timestamps where text belongs
        problems.add(col.notna().to_numpy(bool), f"wrong_type:{name}")
        return _null_text(n), is_chat
    if chat_roles is None:
        return text, is_chat
    return _chat_prompts(text, col, chat_values, is_chat_hint, chat_roles, name, problems)


def _chat_prompts(text: pd.Series, raw: pd.Series, list_rows: np.ndarray | None, hint: pd.Series | None,
                  roles: set[str], name: str, problems: Problems) -> tuple[pd.Series, np.ndarray]:
    """Which prompts are chats, as canonical JSON text. Rules: a list value must be a valid chat;
    with an ``is_chat`` column, rows marked true must hold chat JSON text; without one, text
    that looks like a JSON message list and parses as a valid chat is a chat, other text stays
    plain. Invalid chats get ``bad_chat``, ``blank`` or ``control_chars`` on ``name``."""
    is_chat = np.zeros(len(text), bool)
    if hint is not None:
        marked = flag_values(hint, "is_chat", problems) & text.notna().to_numpy()
    else:
        marked = pc.fill_null(pc.match_substring_regex(pa.array(text), _CHAT_LIKE), False).to_numpy(zero_copy_only=False)
    strict = hint is not None  # a marked row must be a chat; an unmarked lookalike may be plain text
    candidates = [(int(i), v, strict) for i, v in zip(np.flatnonzero(marked), text[marked], strict=True)]
    if list_rows is not None:
        values = raw.to_numpy()
        candidates += [(int(i), values[i], True) for i in list_rows]
    updates: dict[int, str] = {}
    for i, value, must in candidates:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                value = None
        js, reason = chat_json(value, roles)
        if js is not None:
            updates[i] = js
            is_chat[i] = True
        elif must or reason != "bad_chat":
            problems.add([i], f"{reason}:{name}")
    if updates:
        text = text.copy()
        text.iloc[np.fromiter(updates, np.int64, len(updates))] = list(updates.values())
    return text, is_chat


FLAGS = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False, "yes": True, "no": False,
         "t": True, "f": False, "y": True, "n": False, "": False}
"""Spellings of a boolean flag column (``is_chat``) in text exports (case and whitespace folded)."""


def flag_values(col: pd.Series, name: str, problems: Problems) -> np.ndarray:
    """A boolean flag column as bool: booleans, 0/1 and the spellings of ``FLAGS`` (CSV cells are
    text: ``"false"`` is False, not a non-empty string); missing is False; anything else gets
    ``invalid_value:<name>`` and counts as False."""
    if pd.api.types.is_bool_dtype(col):
        return col.fillna(False).astype(bool).to_numpy()

    def one(v):
        if _isna(v):
            return False
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, float, np.integer, np.floating)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str):
            return FLAGS.get(v.strip().lower())
        return None

    values = col.map(one)
    problems.add(values.isna().to_numpy(bool), f"invalid_value:{name}")
    return values.eq(True).to_numpy(bool)


def coerce_choice(col: pd.Series) -> pd.Series:
    """Valid choices folded to ``a``/``b``/``tie``; anything else kept as text for the schema to reject."""
    text = col.astype("str") if _is_stringy(col) else col.map(lambda v: None if _isna(v) else str(v)).astype("str")
    folded = text.str.strip().str.lower()
    return folded.where(folded.isin(("a", "b", "tie")), text)


def _isna(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def coerce_score(col: pd.Series, name: str, problems: Problems) -> pd.Series:
    """Numbers (or numeric strings) as float64; booleans and non-numbers: ``wrong_type``."""
    if pd.api.types.is_bool_dtype(col):
        problems.add(col.notna().to_numpy(bool), f"wrong_type:{name}")
        return pd.Series(np.nan, index=col.index)
    if pd.api.types.is_numeric_dtype(col):
        return col.astype("float64")
    if col.dtype == object:
        col = col.where(~col.map(lambda v: isinstance(v, (bool, np.bool_, list, dict, np.ndarray))), "not a number")
    values = pd.to_numeric(col, errors="coerce").astype("float64")
    problems.add((values.isna() & col.notna()).to_numpy(bool), f"wrong_type:{name}")
    return values


def coerce_label(col: pd.Series, name: str, problems: Problems) -> pd.Series:
    """Thumbs up/down as bool (see ``LABELS``); other values: ``invalid_value``; nulls: ``missing``."""
    if pd.api.types.is_bool_dtype(col) and not col.isna().any():
        return col.astype(bool)
    na = col.isna().to_numpy(bool)
    problems.add(na, f"missing:{name}")  # the bool column cannot hold the null for the schema to see
    text = col.map(lambda v: None if _isna(v) else str(v)).astype("str").str.strip().str.lower()
    mapped = text.map(LABELS)
    problems.add(~na & mapped.isna().to_numpy(bool), f"invalid_value:{name}")
    # eq(True), not fillna(False): a column with no valid label maps to float NaN, which pandas 4 will not fill
    # with a bool (Pandas4Warning today); those rows are quarantined whatever their value here
    return mapped.eq(True)


def coerce_list(col: pd.Series, name: str, problems: Problems, element: str) -> pd.Series:
    """A list field (JSON text in CSV cells) as Python lists of ``str`` or ``int`` elements."""
    out: list = [None] * len(col)
    bad: list[int] = []
    for i, v in enumerate(col.tolist()):
        if _isna(v):
            continue
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError:
                bad.append(i)
                continue
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if not isinstance(v, (list, tuple)):
            bad.append(i)
            continue
        if element == "str" and all(isinstance(x, str) for x in v):
            out[i] = list(v)
        elif element == "int" and all(isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
                                      and float(x).is_integer() for x in v):
            out[i] = [int(x) for x in v]
        else:
            bad.append(i)
    problems.add(bad, f"wrong_type:{name}")
    return pd.Series(out, index=col.index, dtype=object)


def coerce_timestamp(col: pd.Series, name: str, problems: Problems, settings: IngestSettings) -> pd.Series:
    """Timestamps as datetime64[us, UTC]: datetime columns, epoch numbers (``timestamp_unit``) or
    strings (``timestamp_format``, default ISO 8601; no zone means UTC)."""
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        out = col.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(col):
        out = col.dt.tz_localize("UTC")
    elif pd.api.types.is_bool_dtype(col):
        out = pd.Series(pd.NaT, index=col.index, dtype="datetime64[us, UTC]")
    elif pd.api.types.is_numeric_dtype(col):
        out = pd.to_datetime(col, unit=settings.timestamp_unit, utc=True, errors="coerce")
    else:
        numeric = pd.Series(False, index=col.index)
        strings = col
        if col.dtype == object:
            numeric = col.map(lambda v: isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool))
            strings = col.where(col.map(lambda v: isinstance(v, str)), None)
        out = pd.to_datetime(strings.astype("str"), format=settings.timestamp_format or "ISO8601", utc=True,
                             errors="coerce")
        if numeric.any():
            nums = pd.to_numeric(col[numeric], errors="coerce")
            out = out.astype("datetime64[us, UTC]")
            out[numeric] = pd.to_datetime(nums, unit=settings.timestamp_unit, utc=True, errors="coerce").astype(
                "datetime64[us, UTC]")
    out = out.astype("datetime64[us, UTC]")
    problems.add((out.isna() & col.notna()).to_numpy(bool), f"unparseable_timestamp:{name}")
    return out


def coerce_id(col: pd.Series, name: str, problems: Problems) -> pd.Series:
    """Ids as text; integers (and integral floats) are accepted and written without a decimal point."""
    if _is_stringy(col):
        return col.astype("str") if isinstance(col.dtype, pd.StringDtype) else _object_strings(col, name, problems)

    def one(v):
        if _isna(v):
            return None
        if isinstance(v, str):
            return v
        if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            return str(int(v))
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return str(int(v))
        return False

    values = col.map(one)
    wrong = values.map(lambda v: v is False).to_numpy(bool)
    problems.add(wrong, f"wrong_type:{name}")
    return values.where(~wrong, None).astype("str")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "isoformat"):
        return o.isoformat()
    if isinstance(o, bytes):
        return o.decode("utf-8", "replace")
    return str(o)


def to_json(value) -> str:
    """JSON text of any value read from a source (NaN becomes null, numpy values become Python)."""
    def clean(v):
        if isinstance(v, float) and np.isnan(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, np.ndarray)):
            return [clean(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
        if v is pd.NaT:
            return None
        return v
    try:
        return json.dumps(clean(value), ensure_ascii=False, default=_json_default)
    except RecursionError:  # readers cap nesting; a value from elsewhere is shown as a note
        return json.dumps("(a value nested too deeply to show)")


def coerce_metadata(col: pd.Series) -> pd.Series:
    """Metadata as JSON text (strings are kept as given)."""
    if _is_stringy(col):
        return col.astype("str") if isinstance(col.dtype, pd.StringDtype) else _object_strings(col, "metadata", Problems())
    return col.map(lambda v: None if _isna(v) or v is pd.NaT else v if isinstance(v, str) else to_json(v)).astype("str")


def coerce_frame(raw: pd.DataFrame, kind: str, settings: IngestSettings, problems: Problems) -> pd.DataFrame:
    """The typed fields of ``kind`` (required, ``is_chat``, optional) from a raw frame with index 0..n-1.

    Missing required columns give ``missing:<field>`` on every row (the schema re-reports nulls;
    validation keeps one reason per field).
    """
    n = len(raw)
    out: dict[str, pd.Series | np.ndarray] = {}
    roles = set(settings.chat_roles)
    for field in REQUIRED[kind]:
        if field not in raw.columns:
            problems.add(np.ones(n, bool), f"missing:{field}")
        col = raw[field] if field in raw.columns else pd.Series([None] * n, dtype=object)
        if field == "prompt":
            out["prompt"], out["is_chat"] = coerce_text(col, field, problems, chat_roles=roles,
                                                        is_chat_hint=raw.get("is_chat"))
        elif field in ("response", "response_a", "response_b"):
            out[field] = coerce_text(col, field, problems)[0]
        elif field == "choice":
            out[field] = coerce_choice(col)
        elif field == "score":
            out[field] = coerce_score(col, field, problems)
        elif field == "label":
            out[field] = coerce_label(col, field, problems)
        elif field in ("responses", "ranking"):
            out[field] = coerce_list(col, field, problems, "str" if field == "responses" else "int")
    for field in OPTIONAL:
        col = raw.get(field)
        if col is None:
            out[field] = (pd.Series(pd.NaT, index=range(n), dtype="datetime64[us, UTC]") if field == "created_at"
                          else _null_text(n))
        elif field == "created_at":
            out[field] = coerce_timestamp(col, field, problems, settings)
        elif field == "metadata":
            out[field] = coerce_metadata(col)
        else:
            out[field] = coerce_id(col, field, problems)
    if settings.require_timestamp:
        problems.add(pd.Series(out["created_at"]).isna().to_numpy(bool) & ~raw.get(
            "created_at", pd.Series([None] * n)).notna().to_numpy(bool), "missing:created_at")
    frame = pd.DataFrame({k: (v.reset_index(drop=True) if isinstance(v, pd.Series) else v) for k, v in out.items()})
    return frame
