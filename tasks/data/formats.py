"""Public preference-data layouts, converted into alignflow's kinds before validation.

* ``chosen_rejected`` -> pairwise rows with ``choice = "a"`` (``response_a`` is the chosen one;
  with UltraFeedback-binarized ``score_chosen``/``score_rejected``, equal scores give
  ``choice = "tie"``, which the builder drops or half-weights like any tie, and a chosen response
  scored below the rejected one is quarantined as ``chosen_scored_lower``):
  - ``prompt``, ``chosen``, ``rejected`` as strings (TRL's standard format);
  - chat message lists (TRL's conversational format, UltraFeedback-binarized): with a
    ``prompt`` list, ``chosen``/``rejected`` are the assistant turn(s) after it (a leading copy
    of the prompt is removed); without one, the shared message prefix of ``chosen`` and
    ``rejected`` is the prompt;
  - HH-RLHF full conversations (``chosen``/``rejected`` strings of ``\\n\\nHuman: ...
    \\n\\nAssistant: ...`` turns, no prompt): everything up to the last ``\\n\\nAssistant:`` is
    the shared prompt, turned into a chat message list; the rest is the response.
* ``ultrafeedback`` -> rating rows: ``instruction`` (or ``prompt``) plus ``completions``, a list
  of ``{"response": ..., "<score_field>": ..., "annotations": {aspect: {"Rating": ...}}}``;
  one rating row per completion (its source row is the record's).
* ``messages`` -> demonstration rows, read as they are: a ``messages`` column (OpenAI style,
  ``role``/``content``) or a ``conversations`` column (ShareGPT style, ``from``/``value`` with
  ``human``/``gpt``/``system``; either key style in either column). The last turn must be the
  assistant's: it is the response, every turn before it the chat prompt (earlier assistant turns
  stay as context, not as targets).
* ``unpaired`` -> binary rows: TRL's unpaired preference layout ``prompt``/``completion``/``label``
  (thumbs: label true = desirable); ``completion`` is the response.
* ``prompt_completion`` -> demonstration rows: TRL's ``prompt``/``completion`` (no label).
  In both TRL layouts the prompt may be a message list and the completion a one-assistant-turn list.

Rows that cannot be converted get a reason (``bad_chat:prompt``, ``hh_no_assistant_turn``,
``hh_prefix_mismatch``, ``response_not_single_assistant_turn``, ``bad_completions``,
``missing:rejected``, ``wrong_type:score_chosen``, ...) and are quarantined; the rest go on to
validation like native rows. Reasons name the file's own columns: :attr:`Converted.fields` maps
each field back to the column it came from (``response_b`` -> ``rejected``).

Nothing is dropped silently: ``prompt_id`` and the scores are kept in ``metadata`` (when the
file has no ``metadata`` column); a column the conversion does not use (``messages``, which
repeats prompt and chosen) is named in the file's report notes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tasks.data.schemas import OPTIONAL

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Converted:
    """Rows in alignflow's fields, with where each came from in the raw frame."""

    frame: pd.DataFrame
    """Converted rows, index 0..n-1."""
    src: np.ndarray
    """Raw-frame position of each converted row."""
    kind: str | None
    """The kind the layout implies (None for native rows)."""
    failures: list[tuple[int, str]] = field(default_factory=list)
    """(raw position, reason) of rows that could not be converted."""
    fields: dict[str, str] = field(default_factory=dict)
    """Field -> the raw column it was taken from, where the names differ."""
    used: set[str] = field(default_factory=set)
    """Raw columns the conversion read (the report names the others as not kept)."""
    notes: list[str] = field(default_factory=list)
    """What the report should say about the conversion."""


CHAT_COLUMNS = ("messages", "conversations")
"""Columns holding a whole conversation (OpenAI ``messages``, ShareGPT ``conversations``)."""
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system", "tool": "tool"}
"""ShareGPT ``from`` values (and OpenAI roles) -> role; any other role makes the row ``bad_chat``."""


def detect_layout(columns) -> str:
    """``ultrafeedback``, ``chosen_rejected``, ``messages``, ``unpaired``, ``prompt_completion`` or
    ``native`` from the column names (alignflow's own fields win where both are present)."""
    cols = set(columns)
    if "completions" in cols and ({"instruction", "prompt"} & cols):
        return "ultrafeedback"
    if {"chosen", "rejected"} <= cols and not ({"response_a", "response_b"} & cols):
        return "chosen_rejected"
    if {"response", "response_a", "responses"} & cols:
        return "native"
    if {"prompt", "completion"} <= cols:
        return "unpaired" if "label" in cols else "prompt_completion"
    if set(CHAT_COLUMNS) & cols:  # a ``prompt`` beside it (UltraChat) repeats the first turn
        return "messages"
    return "native"


def convert(raw: pd.DataFrame, layout: str = "auto", *, score_field: str = "fine-grained_score") -> Converted:
    """Convert a raw frame (index 0..n-1) from a public layout. Raises ValueError on an unknown layout."""
    layout = detect_layout(raw.columns) if layout == "auto" else layout
    if layout == "native":
        return Converted(raw, np.arange(len(raw)), None)
    if layout == "chosen_rejected":
        return _chosen_rejected(raw)
    if layout == "ultrafeedback":
        return _ultrafeedback(raw, score_field)
    if layout == "messages":
        return _conversations(raw)
    if layout in ("unpaired", "prompt_completion"):
        return _prompt_completion(raw, labelled=layout == "unpaired")
    raise ValueError(f"unknown layout {layout!r}")


def chat_turns(value) -> list[dict] | None:
    """A message list in OpenAI (``role``/``content``) or ShareGPT (``from``/``value``) keys, or its
    JSON text, as ``[{"role", "content"}]`` with ShareGPT roles mapped; None when it is not one."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(m, dict) for m in value):
        return None
    turns = []
    for m in value:
        role = m.get("role") or m.get("from")  # Arrow structs of mixed files hold both keys, one null
        content = m.get("content") if m.get("content") is not None else m.get("value")
        role = SHAREGPT_ROLES.get(role.strip().lower()) if isinstance(role, str) else None
        if role is None:
            return None
        turns.append({"role": role, "content": content})
    return turns


def _conversations(raw: pd.DataFrame) -> Converted:
    """Whole conversations -> demonstrations: the last (assistant) turn is the response."""
    col = next(c for c in CHAT_COLUMNS if c in raw.columns)
    prompts, responses, failures = [], [], []
    for i, value in enumerate(raw[col].tolist()):
        turns = chat_turns(value)
        if turns is None:
            failures.append((i, f"bad_chat:{col}"))
        elif turns[-1]["role"] != "assistant":
            failures.append((i, f"last_turn_not_assistant:{col}"))
        elif not any(t["role"] == "user" for t in turns[:-1]):
            failures.append((i, f"no_user_turn:{col}"))
        else:
            prompts.append(turns[:-1])
            responses.append(turns[-1]["content"])
            continue
        prompts.append(None)
        responses.append(None)
    return _rows(raw, {"prompt": prompts, "response": responses}, "demonstration", failures,
                 {"prompt": col, "response": col}, {col})


def _prompt_completion(raw: pd.DataFrame, labelled: bool) -> Converted:
    """TRL's prompt/completion(/label): the completion is the response; a conversational
    completion must be one assistant turn (``bad_chat:completion`` otherwise)."""
    completions, failures = [], []
    for i, value in enumerate(raw["completion"].tolist()):
        turns = chat_turns(value) if not isinstance(value, str) else None
        if turns is None:
            completions.append(value)  # text (or a wrong type, which validation names)
        elif len(turns) == 1 and turns[0]["role"] == "assistant":
            completions.append(turns[0]["content"])
        else:
            failures.append((i, "bad_chat:completion"))
            completions.append(None)
    prompts = [chat_turns(p) or p if not isinstance(p, str) else p for p in raw["prompt"].tolist()]
    columns = {"prompt": prompts, "response": completions}
    if labelled:
        columns["label"] = raw["label"].tolist()
    used = {"prompt", "completion", *(["label"] if labelled else [])}
    return _rows(raw, columns, "binary" if labelled else "demonstration", failures, {"response": "completion"}, used)


def _rows(raw: pd.DataFrame, columns: dict[str, list], kind: str, failures: list[tuple[int, str]],
          fields: dict[str, str], used: set[str]) -> Converted:
    """Converted rows (failed ones left out) plus the file's optional fields, in alignflow's names."""
    out = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in columns.items()})
    for col in OPTIONAL:
        if col in raw.columns:
            out[col] = raw[col].to_numpy()
            used.add(col)
    keep = np.ones(len(raw), bool)
    keep[[i for i, _ in failures]] = False
    return Converted(out[keep].reset_index(drop=True), np.flatnonzero(keep), kind, failures, fields, used)


def _messages(value) -> list | None:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value):
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    return None


def _single_assistant(turns: list) -> str | None:
    if len(turns) == 1 and turns[0]["role"] == "assistant" and isinstance(turns[0]["content"], str):
        return turns[0]["content"]
    return None


def split_hh(chosen: str, rejected: str) -> tuple[list[dict], str, str] | str:
    """HH-RLHF pair -> (prompt messages, chosen response, rejected response), or a failure reason."""
    ic, ir = chosen.rfind("\n\nAssistant:"), rejected.rfind("\n\nAssistant:")
    if ic < 0 or ir < 0:
        return "hh_no_assistant_turn"
    if chosen[:ic] != rejected[:ir]:
        return "hh_prefix_mismatch"
    prefix = chosen[:ic]
    parts = HH_TURN.split(prefix)
    if parts[0].strip() or len(parts) < 3:
        return "hh_no_human_turn"
    messages = [{"role": HH_ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2], strict=True)]
    cut = len("\n\nAssistant:")
    return messages, chosen[ic + cut:].strip(), rejected[ir + cut:].strip()


def _isna(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _pair_row(prompt, chosen, rejected) -> tuple[object, object, object] | str:
    """One chosen/rejected record -> (prompt, response_a, response_b) or a failure reason."""
    if prompt is None and (isinstance(chosen, str) or isinstance(rejected, str)):  # HH: the prompt is inside
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if _isna(value):
                return f"missing:{name}"
            if not isinstance(value, str):
                return f"wrong_type:{name}"
    if isinstance(chosen, str) and isinstance(rejected, str) and not isinstance(prompt, str) and prompt is None:
        out = split_hh(chosen, rejected)
        if isinstance(out, str):
            return out
        return json.dumps(out[0], ensure_ascii=False), out[1], out[2]
    c_msgs, r_msgs = _messages(chosen), _messages(rejected)
    if c_msgs is None or r_msgs is None:  # plain strings (or wrong types, which validation reports)
        return prompt, chosen, rejected
    p_msgs = _messages(prompt) if prompt is not None and not isinstance(prompt, str) else None
    if p_msgs is None and isinstance(prompt, str):
        p_msgs = [{"role": "user", "content": prompt}]
        strip = [p_msgs, []]
    elif p_msgs is None:
        k = 0
        while k < min(len(c_msgs), len(r_msgs)) and c_msgs[k] == r_msgs[k]:
            k += 1
        while k > 0 and c_msgs[k - 1]["role"] == "assistant":  # the prompt ends before an assistant turn
            k -= 1
        if k == 0:
            return "bad_chat:prompt"
        p_msgs, strip = c_msgs[:k], [c_msgs[:k]]
    else:
        strip = [p_msgs]
    rest = []
    for msgs in (c_msgs, r_msgs):
        for s in strip:
            if s and msgs[: len(s)] == s:
                msgs = msgs[len(s):]
                break
        rest.append(_single_assistant(msgs))
    if rest[0] is None or rest[1] is None:
        return "response_not_single_assistant_turn"
    prompt_out = prompt if isinstance(prompt, str) else json.dumps(p_msgs, ensure_ascii=False)
    return prompt_out, rest[0], rest[1]


def _chosen_rejected(raw: pd.DataFrame) -> Converted:
    n = len(raw)
    prompt = raw["prompt"] if "prompt" in raw.columns else pd.Series([None] * n, dtype=object)
    chosen, rejected = raw["chosen"], raw["rejected"]
    simple = (isinstance(prompt.dtype, pd.StringDtype) and isinstance(chosen.dtype, pd.StringDtype)
              and isinstance(rejected.dtype, pd.StringDtype))
    out = pd.DataFrame({"prompt": prompt, "response_a": chosen, "response_b": rejected})
    is_chat = np.zeros(n, bool)
    failures: list[tuple[int, str]] = []
    if not simple:  # chat lists or HH conversations: per row
        rows = []
        for i, (p, c, r) in enumerate(zip(prompt.tolist(), chosen.tolist(), rejected.tolist(), strict=True)):
            p = None if isinstance(p, float) and np.isnan(p) else p
            res = _pair_row(p, c, r)
            if isinstance(res, str):
                failures.append((i, res))
                rows.append((None, None, None))
            else:
                rows.append(res)
                is_chat[i] = isinstance(res[0], str) and (not isinstance(p, str)) and res[0].startswith("[")
        out = pd.DataFrame(rows, columns=["prompt", "response_a", "response_b"], dtype=object)
    out["choice"] = "a"
    used = {"chosen", "rejected", *(["prompt"] if "prompt" in raw.columns else [])}
    fields = {"response_a": "chosen", "response_b": "rejected"}
    if {"score_chosen", "score_rejected"} <= set(raw.columns):
        out["choice"] = _choice_from_scores(raw["score_chosen"], raw["score_rejected"], failures)
        used |= {"score_chosen", "score_rejected"}
        fields["choice"] = "score_chosen"
    if is_chat.any():
        out["is_chat"] = is_chat
    elif "is_chat" in raw.columns:  # the file's own flag (validation reads its spellings)
        out["is_chat"] = raw["is_chat"].to_numpy()
        used.add("is_chat")
    for col in OPTIONAL:
        if col in raw.columns:
            out[col] = raw[col].to_numpy()
            used.add(col)
    kept = [c for c in ("prompt_id", "score_chosen", "score_rejected") if c in raw.columns]
    if kept and "metadata" not in raw.columns:  # kept, not dropped: JSON text like any metadata
        records = raw[kept].astype(object).where(raw[kept].notna(), None).to_dict("records")
        out["metadata"] = [json.dumps(r, ensure_ascii=False, default=str) for r in records]
        used |= set(kept)
    keep = np.ones(n, bool)
    keep[[i for i, _ in failures]] = False
    return Converted(out[keep].reset_index(drop=True), np.flatnonzero(keep), "pairwise", failures, fields, used)


def _numbers(col: pd.Series) -> pd.Series:
    """Numbers and numeric strings as float; anything else (booleans, lists, words) as NaN."""
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        return col.astype("float64")
    ok = col.map(lambda v: isinstance(v, (int, float, str, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)))
    return pd.to_numeric(col.where(ok, None), errors="coerce").astype("float64")


def _choice_from_scores(chosen: pd.Series, rejected: pd.Series, failures: list[tuple[int, str]]) -> np.ndarray:
    """``a`` where the chosen response scored higher, ``tie`` where the scores are equal (a tie is not
    a preference); rows whose scores are missing, not numbers, or favour the rejected response fail."""
    failed = {i for i, _ in failures}
    choice = np.full(len(chosen), "a", dtype=object)
    for name, col in (("score_chosen", chosen), ("score_rejected", rejected)):
        values = _numbers(col)
        for i in np.flatnonzero(col.isna().to_numpy(bool)):
            if int(i) not in failed:
                failures.append((int(i), f"missing:{name}"))
                failed.add(int(i))
        for i in np.flatnonzero((values.isna() & col.notna()).to_numpy(bool)):
            if int(i) not in failed:
                failures.append((int(i), f"wrong_type:{name}"))
                failed.add(int(i))
    c, r = _numbers(chosen).to_numpy(float), _numbers(rejected).to_numpy(float)
    with np.errstate(invalid="ignore"):
        choice[c == r] = "tie"
        for i in np.flatnonzero(c < r):
            if int(i) not in failed:
                failures.append((int(i), "chosen_scored_lower:score_chosen"))
    failures.sort()
    return choice


def _score(completion: dict, score_field: str):
    if completion.get(score_field) is not None:
        return completion[score_field]
    ratings = []
    for aspect in (completion.get("annotations") or {}).values():
        try:
            ratings.append(float(aspect.get("Rating")))
        except (TypeError, ValueError, AttributeError):
            continue
    return float(np.mean(ratings)) if ratings else None


def _ultrafeedback(raw: pd.DataFrame, score_field: str) -> Converted:
    prompt_col = "instruction" if "instruction" in raw.columns else "prompt"
    rows, src, failures = [], [], []
    optional = [c for c in OPTIONAL if c in raw.columns and c != "metadata"]
    for i, (prompt, comps) in enumerate(zip(raw[prompt_col].tolist(), raw["completions"].tolist(), strict=True)):
        if isinstance(comps, np.ndarray):
            comps = comps.tolist()
        if not isinstance(comps, list) or not comps or not all(isinstance(c, dict) for c in comps):
            failures.append((i, "bad_completions"))
            continue
        extra = {c: raw[c].iat[i] for c in optional}
        for j, comp in enumerate(comps):
            meta = {"completion": j, **({"model": comp["model"]} if comp.get("model") is not None else {})}
            rows.append({"prompt": prompt, "response": comp.get("response"), "score": _score(comp, score_field),
                         "metadata": json.dumps(meta), **extra})
            src.append(i)
    frame = pd.DataFrame(rows, columns=["prompt", "response", "score", "metadata", *optional])
    fields = {"prompt": prompt_col, "response": "completions.response", "score": f"completions.{score_field}"}
    return Converted(frame, np.asarray(src, dtype=np.int64), "rating", failures, fields,
                     {prompt_col, "completions", *optional})
