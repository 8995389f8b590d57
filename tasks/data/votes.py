"""Validated tables -> integer-coded feedback: comparisons, thumbs, ratings and demonstrations.

Texts become codes into two shared vocabularies (prompts, responses) keyed by normalised text
(:mod:`tasks.data.keys`), so whitespace variants of the same text are one item. Pairwise rows
and rankings become *comparisons* of an unordered response pair ``(x, y)`` with ``x < y`` and an
outcome (0: x preferred, 1: y preferred, 2: tie); a ranking of k responses gives its k(k-1)/2
comparisons. Rows identical after normalisation (same annotator, label and timestamp, e.g. the
same export ingested twice) are counted once when ``dedup`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.data.keys import Vocabulary, build_vocabulary, encode, first_of_groups, normalize_ws, prompt_keys

NO_TIME = np.iinfo(np.int64).min


@dataclass
class Comparisons:
    """One row per judged response pair (x < y by code)."""

    prompt: np.ndarray
    x: np.ndarray
    y: np.ndarray
    outcome: np.ndarray
    annotator: np.ndarray


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
    """Columns of one kind's validated Parquet files, read one at a time on demand, so the
    builder never holds every text column at once."""

    def __init__(self, paths: list) -> None:
        import pyarrow.parquet as pq

        self._pq = pq
        self.paths = list(paths)
        self.num_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in self.paths)

    def column(self, name: str) -> pa.ChunkedArray:
        chunks = []
        for p in self.paths:
            chunks.extend(self._pq.read_table(p, columns=[name], pre_buffer=False).column(name).chunks)
        if not chunks:
            return pa.chunked_array([], pa.large_string())
        kind = chunks[0].type
        return pa.chunked_array([c if c.type == kind else c.cast(kind) for c in chunks], type=kind)


def _col(source, name: str) -> pa.ChunkedArray:
    if source is None or not source.num_rows:
        return pa.chunked_array([], pa.large_string())
    return source.column(name)


def _times(source) -> np.ndarray:
    t = _col(source, "created_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return pc.fill_null(t, NO_TIME).to_numpy()


def _pairwise(t, p: np.ndarray, ra: np.ndarray, rb: np.ndarray, a: np.ndarray, counts: dict,
              dedup: bool) -> tuple[np.ndarray, ...]:
    """Pairwise rows -> comparisons (x < y, outcome 0/1/2); degenerate and repeated rows dropped."""
    choice = _col(t, "choice").to_numpy(zero_copy_only=False)
    x, y = np.minimum(ra, rb), np.maximum(ra, rb)
    outcome = np.where(choice == "tie", 2, np.where((choice == "a") == (ra == x), 0, 1)).astype(np.int8)
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


def encode_feedback(tables: dict[str, ColumnSource | pa.Table], *, dedup: bool = True) -> Feedback:
    """Code validated tables (by kind; missing kinds are skipped) into :class:`Feedback`.

    Text columns are read (from a :class:`ColumnSource`, or an in-memory table) and encoded a
    group at a time: all prompts, then all responses; only their codes and vocabularies stay.
    """
    kinds = [k for k in ("pairwise", "ranking", "rating", "binary", "demonstration") if k in tables]
    texts = [_col(tables[k], "prompt") for k in kinds]
    keys = [prompt_keys(c, _col(tables[k], "is_chat").to_numpy(zero_copy_only=False))
            for k, c in zip(kinds, texts, strict=True)]
    prompts, p_codes = build_vocabulary(list(zip(texts, keys, strict=True)))
    texts, rank_offsets = [], None
    for kind in kinds:
        t = tables[kind]
        if kind == "pairwise":
            texts += [_col(t, "response_a"), _col(t, "response_b")]
        elif kind == "ranking":
            lists = _col(t, "responses").combine_chunks() if t.num_rows else None
            rank_offsets = lists.offsets.to_numpy() - lists.offsets[0].as_py() if lists is not None else None
            texts.append(pc.list_flatten(lists) if lists is not None else pa.array([], pa.large_string()))
        else:
            texts.append(_col(t, "response"))
    responses, r_codes = build_vocabulary([(c, normalize_ws(c)) for c in texts])
    del texts, keys
    names, annotators = _annotator_codes(kinds, tables)
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
