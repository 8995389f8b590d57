"""The preference builder: validated tables -> canonical pairs, prompts, demonstrations, data card.

Reads every validated table under ``validated/<kind>/`` (all batches ingested so far),
then: codes texts by normalised key and drops repeated rows (:mod:`tasks.data.votes`); scores
annotators against the leave-one-out majority and applies ``annotator_action``; aggregates
comparisons by weighted vote, and turns thumbs and ratings into pairs within a prompt
(:mod:`tasks.data.aggregate`); keeps one pair per prompt and response pair (explicit
comparisons win over ratings, ratings over thumbs); drops or keeps ties; drops or down-weights
low-agreement pairs; resolves the unpaired (KTO) set of single labelled responses
(:mod:`tasks.data.unpaired`); assigns splits by a salted hash of the prompt key (a prompt is in exactly
one split, the same one in every build); writes Parquet files (rows sorted by id, so the same
content gives the same bytes) and the data card.

The version is the content digest: sha256 over the multiset of row hashes of the pairs,
prompts, demonstrations and unpaired responses (texts, labels, weights and agreement rounded to 1e-6, annotators, split):
row order and input file order do not change it; any content change does. ``source_digest``
(a column, and in the record) identifies the validated input files instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.data.aggregate import (
    AnnotatorStats,
    PairSet,
    aggregate_comparisons,
    annotator_quality,
    ratings_to_pairs,
    thumbs_to_pairs,
)
from tasks.data.card import length_stats, write_card
from tasks.data.handoff import validated_files
from tasks.data.heap import retained_heap
from tasks.data.keys import (
    CHAT_KEY_PREFIX,
    assign_splits,
    digest_of_rows,
    float_bits,
    group_ids,
    hash64,
    hex16,
    mix64,
    parquet_options,
)
from tasks.data.readers import content_digest
from tasks.data.settings import PreferenceSettings
from tasks.data.unpaired import UnpairedSet, unpaired_items
from tasks.data.votes import ColumnSource, Feedback, encode_feedback

SPLITS = ("train", "validation", "test")
DIGEST_TAG = "alignflow-preferences-v1"


class EmptyPreferenceDataset(ValueError):
    """Fewer pairs than ``preferences.min_pairs`` came out of the build."""


@dataclass
class PreferenceBuild:
    """What a build hands on (paths, digests, counts), small enough to pass between tasks."""

    digest: str
    """Content digest of pairs + prompts + demonstrations + unpaired: the dataset version."""
    source_digest: str
    """Digest of the validated input files."""
    out_dir: str
    pairs: str
    prompts: str
    demonstrations: str
    card_json: str
    card_md: str
    split_files: dict[str, dict[str, str]] = field(default_factory=dict)
    """``{"pairs": {"train": path, ...}, "prompts": {...}, "demonstrations": {...}, "unpaired": {...}}``."""
    digests: dict[str, str] = field(default_factory=dict)
    """Digest of each table (pairs, prompts, demonstrations, unpaired)."""
    counts: dict[str, int | str] = field(default_factory=dict)
    """Row, vote, pair, split and annotator counts (``demonstrations_from`` is a word)."""
    unpaired: str = ""
    """The unpaired (KTO) responses: ``prompt, is_chat, completion, label, weight, agreement, split``."""

    def to_dict(self) -> dict:
        return asdict(self)


def _source_digest(files: dict[str, list[Path]]) -> str:
    """Digest of the validated input files (kind, name and content of each)."""
    h = hashlib.sha256(b"alignflow-validated-v1")
    for kind, paths in sorted(files.items()):
        for p in paths:
            h.update(f"{kind}\0{p.name}\0{content_digest(p)}\n".encode())
    return h.hexdigest()[:32]


def _resolve(fb: Feedback, stats: AnnotatorStats, settings: PreferenceSettings, counts: dict,
             comparisons: PairSet) -> PairSet:
    """Merge the three pair sources (``comparisons`` already aggregated), then apply the tie and
    agreement policies."""
    sources = [comparisons,
               ratings_to_pairs(fb.ratings, stats.factor, settings, fb.responses.key_hash),
               thumbs_to_pairs(fb.thumbs, stats.factor, settings, fb.responses.key_hash)]
    for name, s in zip(("comparisons", "ratings", "thumbs"), sources, strict=True):
        counts[f"pairs_from_{name}"] = len(s)
    pairs = PairSet.concat(sources)
    counts["pairs_overlapping_dropped"] = 0
    if sum(len(s) > 0 for s in sources) > 1:  # each source alone has one pair per item
        priority = np.repeat(np.arange(3), [len(s) for s in sources])
        lo, hi = np.minimum(pairs.chosen, pairs.rejected), np.maximum(pairs.chosen, pairs.rejected)
        item, n = group_ids(pairs.prompt, lo, hi)
        order = np.lexsort((priority, item))
        first = np.ones(len(order), bool)
        first[1:] = item[order][1:] != item[order][:-1]
        counts["pairs_overlapping_dropped"] = int(len(pairs) - n)
        pairs = pairs.select(np.sort(order[first]))
    counts["ties"] = int(pairs.tie.sum())
    if settings.ties == "drop":
        pairs = pairs.select(~pairs.tie)
    elif pairs.tie.any():
        ties = np.flatnonzero(pairs.tie)
        pairs = pairs.select(np.concatenate([np.arange(len(pairs)), ties]))
        n0 = len(pairs) - len(ties)
        pairs.chosen[n0:], pairs.rejected[n0:] = pairs.rejected[n0:].copy(), pairs.chosen[n0:].copy()
        pairs.weight[np.concatenate([ties, np.arange(n0, len(pairs))])] *= 0.5
    low = pairs.agreement < settings.min_agreement
    counts["low_agreement"] = int(low.sum())
    if settings.low_agreement == "drop":
        pairs = pairs.select(~low)
    else:
        pairs.weight[low] *= settings.low_agreement_weight
    return pairs


def _split_names(codes: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(SPLITS)).cast(pa.string())


Slicer = Callable[[int, int], pa.Table]
"""Rows ``[start, stop)`` of an output table, built on demand."""


def _write_split_parts(writers: dict[str, pq.ParquetWriter], part: pa.Table, codes: np.ndarray) -> None:
    for i, name in enumerate(SPLITS):
        if (codes == i).any():
            writers[name].write_table(part.filter(pa.array(codes == i)))


def _write_table(out: Path, stem: str, slicer: Slicer, n: int, split: np.ndarray, pool: ThreadPoolExecutor,
                 rows: int = 1 << 16) -> tuple[str, dict[str, str]]:
    """Write ``<stem>.parquet`` (every row) and ``<stem>-<split>.parquet`` (each split's rows),
    ``rows`` rows at a time: each slice is built once (texts taken from the vocabularies for
    those rows only, so no whole table is ever held) and written to the whole file and the
    split files by two pool threads side by side (Parquet encoding releases the GIL) while
    this thread builds the next slice. Returns the whole file's path and the path per split."""
    whole_path = out / f"{stem}.parquet"
    split_paths = {name: out / f"{stem}-{name}.parquet" for name in SPLITS}
    first = slicer(0, min(rows, n))
    options = parquet_options(first.schema)
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        writers["all"] = pq.ParquetWriter(whole_path, first.schema, **options)
        for name, path in split_paths.items():
            writers[name] = pq.ParquetWriter(path, first.schema, **options)
        split_writers = {name: writers[name] for name in SPLITS}
        pending: list[Future] = []
        for start in range(0, n, rows):
            part = first if start == 0 else slicer(start, min(start + rows, n))
            for future in pending:  # one slice in flight bounds the memory
                future.result()
            pending = [pool.submit(writers["all"].write_table, part),
                       pool.submit(_write_split_parts, split_writers, part, split[start:start + rows])]
        for future in pending:
            future.result()
    finally:
        for w in writers.values():
            w.close()
    return str(whole_path), {name: str(p) for name, p in split_paths.items()}


def _count_splits(counts: dict, name: str, split: np.ndarray) -> None:
    counts[name] = int(len(split))
    for i, sp in enumerate(SPLITS):
        counts[f"{name}_{sp}"] = int((split == i).sum())


def _codes(values: np.ndarray) -> pa.Array:
    return pa.array(values, pa.int64())


def _pairs_output(pairs: PairSet, fb: Feedback, prompt_chat: np.ndarray, prompt_split: np.ndarray,
                  source_digest: str) -> tuple[Slicer, np.ndarray, np.ndarray, PairSet]:
    """The pairs sorted by id: a slicer of their table, their row hashes and split codes, and
    the sorted pairs."""
    P, R = fb.prompts, fb.responses
    pair_hash = mix64(P.key_hash[pairs.prompt], R.key_hash[pairs.chosen], R.key_hash[pairs.rejected])
    order = np.argsort(pair_hash, kind="stable")
    pairs, pair_hash = pairs.select(order), pair_hash[order]
    weight, agreement = np.round(pairs.weight, 6), np.round(pairs.agreement, 6)
    offsets = np.searchsorted(pairs.link_pair, np.arange(len(pairs) + 1)).astype(np.int32)
    names = pa.array(fb.annotators, pa.string())
    link_hash = np.append(mix64(hash64(fb.annotators)[pairs.link_annotator]), np.uint64(0))
    ann_sum = np.add.reduceat(link_hash, offsets[:-1]) if len(pairs) else np.zeros(0, np.uint64)
    ann_sum = np.where(np.diff(offsets) > 0, ann_sum, np.uint64(0))  # an annotator set, order-free
    split = prompt_split[pairs.prompt]
    rows = mix64(P.original_hash[pairs.prompt], prompt_chat[pairs.prompt].astype(np.uint64),
                 R.original_hash[pairs.chosen], R.original_hash[pairs.rejected], float_bits(weight),
                 float_bits(agreement), ann_sum, split.astype(np.uint64))
    digest_column = pa.array([source_digest], pa.string())

    def slicer(a: int, b: int) -> pa.Table:
        off = offsets[a:b + 1]
        return pa.table({
            "prompt": P.originals.take(_codes(pairs.prompt[a:b])), "is_chat": pa.array(prompt_chat[pairs.prompt[a:b]]),
            "chosen": R.originals.take(_codes(pairs.chosen[a:b])),
            "rejected": R.originals.take(_codes(pairs.rejected[a:b])),
            "pair_id": hex16(pair_hash[a:b]), "weight": pa.array(weight[a:b]),
            "annotators": pa.ListArray.from_arrays(pa.array(off - off[0]),
                                                   names.take(_codes(pairs.link_annotator[off[0]:off[-1]]))),
            "agreement": pa.array(agreement[a:b]), "split": _split_names(split[a:b]),
            "source_digest": digest_column.take(pa.array(np.zeros(b - a, np.int8))),
        })

    return slicer, rows, split, pairs


def _demonstrations(fb: Feedback, pairs: PairSet, settings: PreferenceSettings,
                    counts: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt codes, response codes, weights) of the SFT set: demonstration rows, else the
    chosen responses (weight: the best pair weight of each), sorted by their key hash."""
    d_prompt, d_resp = fb.demonstrations
    d_weight = np.ones(len(d_prompt))
    counts["demonstrations_from"] = "rows" if len(d_prompt) else settings.demonstrations_fallback
    if not len(d_prompt) and settings.demonstrations_fallback == "chosen" and len(pairs):
        gid, n = group_ids(pairs.prompt, pairs.chosen)
        order = np.lexsort((-pairs.weight, gid))  # per group, the highest weight first
        first = order[np.r_[True, gid[order][1:] != gid[order][:-1]]]
        d_prompt, d_resp, d_weight = pairs.prompt[first], pairs.chosen[first], np.round(pairs.weight[first], 6)
    d_order = np.argsort(mix64(fb.prompts.key_hash[d_prompt], fb.responses.key_hash[d_resp]), kind="stable")
    return d_prompt[d_order], d_resp[d_order], d_weight[d_order]


def _text_lengths(texts: pa.Array) -> np.ndarray:
    return pc.utf8_length(texts).to_numpy(zero_copy_only=False) if len(texts) else np.zeros(0, np.int64)


def _unpaired_output(items: UnpairedSet, fb: Feedback, prompt_chat: np.ndarray,
                     prompt_split: np.ndarray) -> tuple[Slicer, np.ndarray, np.ndarray]:
    """The unpaired items sorted by (prompt, response) key: a slicer of their table, row hashes, split codes."""
    P, R = fb.prompts, fb.responses
    order = np.argsort(mix64(P.key_hash[items.prompt], R.key_hash[items.response]), kind="stable")
    items = items.select(order)
    weight, agreement = np.round(items.weight, 6), np.round(items.agreement, 6)
    split = prompt_split[items.prompt]
    rows = mix64(P.original_hash[items.prompt], prompt_chat[items.prompt].astype(np.uint64),
                 R.original_hash[items.response], items.label.astype(np.uint64), float_bits(weight),
                 float_bits(agreement), split.astype(np.uint64))

    def slicer(a: int, b: int) -> pa.Table:
        return pa.table({
            "prompt": P.originals.take(_codes(items.prompt[a:b])),
            "is_chat": pa.array(prompt_chat[items.prompt[a:b]], pa.bool_()),
            "completion": R.originals.take(_codes(items.response[a:b])),
            "label": pa.array(items.label[a:b], pa.bool_()), "weight": pa.array(weight[a:b], pa.float64()),
            "agreement": pa.array(agreement[a:b], pa.float64()), "split": _split_names(split[a:b]),
        })

    return slicer, rows, split


def _write_outputs(out: Path, fb: Feedback, pairs: PairSet, unpaired: UnpairedSet, settings: PreferenceSettings,
                   counts: dict, prompt_chat: np.ndarray, prompt_split: np.ndarray, source_digest: str):
    """Build and write pairs, prompts, demonstrations and the unpaired set a slice at a time
    (:func:`_write_table`); returns (paths, split files, digests, what the card needs)."""
    P, R = fb.prompts, fb.responses
    paths, files, digests = {}, {}, {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        slicer, rows, split, ordered = _pairs_output(pairs, fb, prompt_chat, prompt_split, source_digest)
        digests["pairs"] = digest_of_rows(rows, DIGEST_TAG + "/pairs")
        p_len, r_len = _text_lengths(P.originals), _text_lengths(R.originals)  # by code: no text taken
        card_parts = {"lengths": {"prompt": length_stats(p_len[ordered.prompt]),
                                  "chosen": length_stats(r_len[ordered.chosen]),
                                  "rejected": length_stats(r_len[ordered.rejected])},
                      "agreement": np.round(ordered.agreement, 6)}
        paths["pairs"], files["pairs"] = _write_table(out, "pairs", slicer, len(ordered), split, pool)
        _count_splits(counts, "pairs", split)

        p_order = np.argsort(P.key_hash, kind="stable")

        def prompt_slice(a: int, b: int) -> pa.Table:
            sel = p_order[a:b]
            return pa.table({"prompt_id": hex16(P.key_hash[sel]), "prompt": P.originals.take(_codes(sel)),
                             "is_chat": pa.array(prompt_chat[sel]), "split": _split_names(prompt_split[sel])})

        digests["prompts"] = digest_of_rows(mix64(P.original_hash, prompt_chat.astype(np.uint64),
                                                  prompt_split.astype(np.uint64)), DIGEST_TAG + "/prompts")
        paths["prompts"], files["prompts"] = _write_table(out, "prompts", prompt_slice, len(P), prompt_split[p_order],
                                                          pool)
        _count_splits(counts, "prompts", prompt_split)

        d_prompt, d_resp, d_weight = _demonstrations(fb, pairs, settings, counts)

        def demo_slice(a: int, b: int) -> pa.Table:
            return pa.table({
                "prompt": P.originals.take(_codes(d_prompt[a:b])), "is_chat": pa.array(prompt_chat[d_prompt[a:b]]),
                "response": R.originals.take(_codes(d_resp[a:b])), "weight": pa.array(d_weight[a:b], pa.float64()),
                "split": _split_names(prompt_split[d_prompt[a:b]]),
            })

        digests["demonstrations"] = digest_of_rows(
            mix64(P.original_hash[d_prompt], R.original_hash[d_resp], float_bits(d_weight),
                  prompt_split[d_prompt].astype(np.uint64)), DIGEST_TAG + "/demonstrations")
        paths["demonstrations"], files["demonstrations"] = _write_table(out, "demonstrations", demo_slice, len(d_prompt),
                                                                        prompt_split[d_prompt], pool)
        _count_splits(counts, "demonstrations", prompt_split[d_prompt])

        u_slice, u_rows, u_split = _unpaired_output(unpaired, fb, prompt_chat, prompt_split)
        digests["unpaired"] = digest_of_rows(u_rows, DIGEST_TAG + "/unpaired")
        paths["unpaired"], files["unpaired"] = _write_table(out, "unpaired", u_slice, len(unpaired), u_split, pool)
        _count_splits(counts, "unpaired", u_split)
        counts["unpaired_desirable"] = int(unpaired.label.sum())
        counts["unpaired_undesirable"] = int(len(unpaired) - unpaired.label.sum())
    return paths, files, digests, card_parts


@retained_heap()
def build_preferences(validated: str | Path | Mapping[str, list], out_dir: str | Path,
                      settings: PreferenceSettings | None = None) -> PreferenceBuild:
    """Build the preference dataset from validated tables into ``out_dir`` (created; files overwritten).

    Each output table is built, written and dropped before the next, to bound memory. Raises
    :class:`EmptyPreferenceDataset` below ``settings.min_pairs`` pairs (nothing is written).
    """
    settings = settings or PreferenceSettings()
    out = Path(out_dir)
    files = validated_files(validated)
    with ThreadPoolExecutor(max_workers=1) as pool:  # sha256 releases the GIL: hash while encoding
        source_digest_future = pool.submit(_source_digest, files)
        fb = encode_feedback({kind: ColumnSource(paths) for kind, paths in files.items()}, dedup=settings.dedup_rows)
        source_digest = source_digest_future.result()
    counts: dict[str, int | str] = dict(fb.counts)
    counts.update(comparisons=len(fb.comparisons.prompt), thumbs=len(fb.thumbs.prompt), ratings=len(fb.ratings.prompt))
    stats = annotator_quality(fb.comparisons, fb.thumbs, len(fb.annotators), settings, fb.ratings)
    comparisons = aggregate_comparisons(fb.comparisons, stats.factor)
    pairs = _resolve(fb, stats, settings, counts, comparisons)
    unpaired = unpaired_items(fb.thumbs, fb.ratings, comparisons, stats.factor, settings, counts)
    if len(pairs) < settings.min_pairs:
        raise EmptyPreferenceDataset(
            f"{len(pairs)} preference pairs built, fewer than preferences.min_pairs={settings.min_pairs} "
            f"(counts: {json.dumps(counts)})")
    P = fb.prompts
    prompt_chat = pc.starts_with(P.keys, CHAT_KEY_PREFIX).to_numpy(zero_copy_only=False) if len(P) else np.zeros(0, bool)
    prompt_split = assign_splits(P.key_hash, settings.splits.train, settings.splits.validation, settings.split_salt)
    out.mkdir(parents=True, exist_ok=True)
    paths, files, digests, card_parts = _write_outputs(out, fb, pairs, unpaired, settings, counts, prompt_chat,
                                                       prompt_split, source_digest)
    digest = hashlib.sha256("".join(digests[k] for k in sorted(digests)).encode()).hexdigest()[:32]
    counts["annotators"] = len(fb.annotators)
    counts["annotators_flagged"] = int(stats.flagged.sum())
    card_json, card_md = write_card(out, card_parts["lengths"], card_parts["agreement"], fb.annotators, stats, counts,
                                    digest, source_digest, settings)
    return PreferenceBuild(digest=digest, source_digest=source_digest, out_dir=str(out), pairs=paths["pairs"],
                           prompts=paths["prompts"], demonstrations=paths["demonstrations"],
                           card_json=card_json, card_md=card_md,
                           split_files=files, digests=digests, counts=counts, unpaired=paths["unpaired"])


def load_pairs(path: str | Path, split: str | None = None):
    """The pairs as a ``datasets.Dataset`` (``path``: a build folder or a pairs Parquet file)."""
    import datasets

    p = Path(path)
    if p.is_dir():
        p = p / (f"pairs-{split}.parquet" if split else "pairs.parquet")
    return datasets.Dataset.from_parquet(str(p))
