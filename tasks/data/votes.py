"""Validated tables -> integer-coded feedback: comparisons, thumbs, ratings and demonstrations.

Texts become codes into two shared vocabularies (prompts, responses) keyed by normalised text
(:mod:`tasks.data.keys`), so whitespace variants of the same text are one item. Pairwise rows
and rankings become *comparisons* of an unordered response pair ``(x, y)`` with ``x < y`` and an
outcome (0: x preferred, 1: y preferred, 2: tie); a ranking of k responses gives its k(k-1)/2
comparisons. Rows identical after normalisation (same annotator, label and timestamp, e.g. the
same export ingested twice) are counted once when ``dedup`` is on.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.data.handoff import open_validated, validated_rows
from tasks.data.keys import (
    Vocabulary,
    build_vocabulary,
    encode,
    first_of_groups,
    group_ids,
    normalize_ws,
    prompt_keys,
)

NO_TIME = np.iinfo(np.int64).min


@dataclass
class Comparisons:
    """One row per judged response pair (x < y by code). Treat as read-only: :attr:`items` is
    computed once."""

    prompt: np.ndarray
    x: np.ndarray
    y: np.ndarray
    outcome: np.ndarray
    annotator: np.ndarray

    @cached_property
    def items(self) -> tuple[np.ndarray, int]:
        """:func:`~tasks.data.keys.group_ids` of (prompt, x, y): the judged item of each row
        (annotator scoring and vote aggregation both group by it)."""
        return group_ids(self.prompt, self.x, self.y)


@dataclass
class Judgements:
    """One row per judged single response: thumbs (``value`` 1/0) or ratings (``value`` the score)."""

    prompt: np.ndarray
    response: np.ndarray
    value: np.ndarray
    annotator: np.ndarray


@dataclass
class Feedback:
    """Everything the builder needs, as codes."""

    prompts: Vocabulary
    responses: Vocabulary
    annotators: list[str]
    comparisons: Comparisons
    thumbs: Judgements
    ratings: Judgements
    demonstrations: tuple[np.ndarray, np.ndarray]
    counts: dict[str, int] = field(default_factory=dict)


class ColumnSource:
    """Columns of one kind's validated files (:mod:`tasks.data.handoff`), read on demand: IPC
    files are memory-mapped, so a column costs no copy; from Parquet ones (older stores) a
    group of columns is read at a time, so the builder never holds every text column at once."""

    def __init__(self, paths: list) -> None:
        self.paths = list(paths)
        self.num_rows = sum(validated_rows(p) for p in self.paths)

    def column(self, name: str) -> pa.ChunkedArray:
        return self.columns([name])[0]

    def columns(self, names: list[str]) -> list[pa.ChunkedArray]:
        """Several columns in one read per file (Parquet decodes the columns in parallel)."""
        chunks: list[list[pa.Array]] = [[] for _ in names]
        for p in self.paths:
            table = open_validated(p, list(names))
            for out, name in zip(chunks, names, strict=True):
                out.extend(table.column(name).chunks)
        return [_chunked(c) for c in chunks]


def _chunked(chunks: list[pa.Array]) -> pa.ChunkedArray:
    """Chunks of one column from several files, cast to the first file's type."""
    if not chunks:
        return pa.chunked_array([], pa.large_string())
    kind = chunks[0].type
    return pa.chunked_array([c if c.type == kind else c.cast(kind) for c in chunks], type=kind)


def _col(source, name: str) -> pa.ChunkedArray:
    if source is None or not source.num_rows:
        return pa.chunked_array([], pa.large_string())
    return source.column(name)


def _cols(source, names: list[str]) -> list[pa.ChunkedArray]:
    if isinstance(source, ColumnSource) and source.num_rows:
        return source.columns(names)
    return [_col(source, n) for n in names]


def _times(source) -> np.ndarray:
    t = _col(source, "created_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return pc.fill_null(t, NO_TIME).to_numpy()


def _pairwise(t, p: np.ndarray, ra: np.ndarray, rb: np.ndarray, a: np.ndarray, counts: dict,
              dedup: bool) -> tuple[np.ndarray, ...]:
    """Pairwise rows -> comparisons (x < y, outcome 0/1/2); degenerate and repeated rows dropped."""
    choice = _col(t, "choice")  # compared in Arrow: no Python string per row

    def is_(value: str) -> np.ndarray:
        return pc.fill_null(pc.equal(choice, value), False).to_numpy(zero_copy_only=False).astype(bool, copy=False)

    x, y = np.minimum(ra, rb), np.maximum(ra, rb)
    outcome = np.where(is_("tie"), 2, np.where(is_("a") == (ra == x), 0, 1)).astype(np.int8)
    ok = x != y  # responses that differ only in whitespace
    keep = ok & (first_of_groups(p, x, y, outcome, a, _times(t)) if dedup else True)
    counts["degenerate_pairs"] = counts.get("degenerate_pairs", 0) + int((~ok).sum())
    counts["duplicate_rows"] = counts.get("duplicate_rows", 0) + int(ok.sum() - keep.sum())
    return p[keep], x[keep], y[keep], outcome[keep], a[keep]


def _judgements(t, kind: str, p: np.ndarray, r: np.ndarray, a: np.ndarray, counts: dict,
                dedup: bool) -> Judgements:
    """Rating rows (value: the score) or thumbs (value 1/0), repeated rows dropped."""
    value = _col(t, "score" if kind == "rating" else "label").to_numpy(zero_copy_only=False).astype(np.float64)
    keep = first_of_groups(p, r, value.view(np.int64), a, _times(t)) if dedup else np.ones(len(p), bool)
    counts["duplicate_rows"] = counts.get("duplicate_rows", 0) + int((~keep).sum())
    return Judgements(p[keep], r[keep], value[keep], a[keep])


def _annotator_codes(kinds: list[str], tables: dict) -> tuple[list[str], dict[str, np.ndarray]]:
    """Annotator names (sorted) and codes per kind (-1: anonymous), in name order, so nothing
    downstream depends on the order rows arrived in."""
    names_arr, codes = encode([_col(tables[k], "annotator_id") for k in kinds])
    names = names_arr.to_pylist()
    rank = np.argsort(np.argsort(np.array(names, dtype=object))) if names else np.zeros(1, np.int64)
    return sorted(names), {k: np.where(c >= 0, rank[np.maximum(c, 0)], -1) for k, c in zip(kinds, codes, strict=True)}


def _prompt_vocabulary(tables: dict, kinds: list[str]) -> tuple[Vocabulary, list[np.ndarray]]:
    """The prompt vocabulary and the prompt codes of each kind."""
    columns = [_cols(tables[k], ["prompt", "is_chat"]) for k in kinds]
    pairs = [(text, prompt_keys(text, chat.to_numpy(zero_copy_only=False))) for text, chat in columns]
    del columns
    return build_vocabulary(pairs)


def _response_vocabulary(tables: dict, kinds: list[str]) -> tuple[Vocabulary, list[np.ndarray], np.ndarray | None]:
    """The response vocabulary, codes per response column (pairwise: a then b; ranking: the
    flattened lists) and the ranking lists' offsets into their flattened codes."""
    texts, rank_offsets = [], None
    for kind in kinds:
        t = tables[kind]
        if kind == "pairwise":
            texts += _cols(t, ["response_a", "response_b"])
        elif kind == "ranking":
            lists = _col(t, "responses").combine_chunks() if t.num_rows else None
            rank_offsets = lists.offsets.to_numpy() - lists.offsets[0].as_py() if lists is not None else None
            texts.append(pc.list_flatten(lists) if lists is not None else pa.array([], pa.large_string()))
        else:
            texts.append(_col(t, "response"))
    vocabulary, codes = build_vocabulary([(c, normalize_ws(c)) for c in texts])
    return vocabulary, codes, rank_offsets


def encode_feedback(tables: dict[str, ColumnSource | pa.Table], *, dedup: bool = True) -> Feedback:
    """Code validated tables (by kind; missing kinds are skipped) into :class:`Feedback`.

    Text columns are read (from a :class:`ColumnSource`, or an in-memory table) and encoded a
    group at a time: the responses in a background thread while this one does the prompts
    (hashing, normalising and Parquet decoding release the GIL for much of their time, so the
    two groups share the machine's cores); only their codes and vocabularies stay.
    """
    kinds = [k for k in ("pairwise", "ranking", "rating", "binary", "demonstration") if k in tables]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_response_vocabulary, tables, kinds)
        prompts, p_codes = _prompt_vocabulary(tables, kinds)
        names, annotators = _annotator_codes(kinds, tables)
        responses, r_codes, rank_offsets = pending.result()
    counts: dict[str, int] = {f"rows_{k}": tables[k].num_rows for k in kinds}
    empty = np.zeros(0, np.int64)
    comp, thumbs, ratings, demos = [], None, None, (empty, empty)
    r_iter = iter(r_codes)
    for kind, p in zip(kinds, p_codes, strict=True):
        t, a = tables[kind], annotators[kind]
        if kind == "pairwise":
            comp.append(_pairwise(t, p, next(r_iter), next(r_iter), a, counts, dedup))
        elif kind == "ranking":
            comp.append(_ranking_comparisons(t, p, next(r_iter), a, rank_offsets, counts, dedup))
        elif kind == "rating":
            ratings = _judgements(t, kind, p, next(r_iter), a, counts, dedup)
        elif kind == "binary":
            thumbs = _judgements(t, kind, p, next(r_iter), a, counts, dedup)
        else:
            r = next(r_iter)
            keep = first_of_groups(p, r)
            demos = (p[keep], r[keep])
    cat = [np.concatenate([c[i] for c in comp]) if comp else empty for i in range(5)]
    none = Judgements(empty, empty, np.zeros(0), empty)
    return Feedback(prompts, responses, names, Comparisons(cat[0], cat[1], cat[2], cat[3].astype(np.int8), cat[4]),
                    thumbs or none, ratings or none, demos, counts)


def _ranking_comparisons(t, p: np.ndarray, flat_codes: np.ndarray, a: np.ndarray, offsets: np.ndarray,
                         counts: dict, dedup: bool) -> tuple[np.ndarray, ...]:
    """Each ranking (best first) -> comparisons between every two of its responses."""
    rankings = _col(t, "ranking").to_pylist()
    times = _times(t)
    seen: set = set()
    out: list[tuple[int, int, int, int, int]] = []
    for i, order in enumerate(rankings):
        codes = flat_codes[offsets[i]:offsets[i + 1]]
        ranked = [int(codes[j]) for j in order]
        if dedup:
            key = (int(p[i]), tuple(ranked), int(a[i]), int(times[i]))
            if key in seen:
                counts["duplicate_rows"] = counts.get("duplicate_rows", 0) + 1
                continue
            seen.add(key)
        for hi in range(len(ranked)):
            for lo in range(hi + 1, len(ranked)):
                better, worse = ranked[hi], ranked[lo]
                if better == worse:
                    counts["degenerate_pairs"] = counts.get("degenerate_pairs", 0) + 1
                    continue
                x, y = min(better, worse), max(better, worse)
                out.append((int(p[i]), x, y, 0 if better == x else 1, int(a[i])))
    arr = np.array(out, dtype=np.int64).reshape(-1, 5)
    return arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], arr[:, 4]
