"""Simulated feedback on the current policy: sample, score with the oracle, label, write files.

One batch: draw prompts, sample ``samples_per_prompt`` responses per prompt from the policy
folder (:func:`alignment.generation.generate`, seeded), score them with the VADER oracle, give
each prompt one feedback kind (pairwise comparisons, ratings or thumbs), let
``labels_per_item`` distinct annotators label each item (:mod:`tasks.demo.annotators`),
corrupt a small share of rows (:mod:`tasks.demo.malformed`) and write the rows into the landing
folder as JSONL, CSV and Parquet files named ``<batch_id>-<kind>-<n>.<ext>``.

Nothing the annotators could not see goes into the landing files. The ground truth (scores,
true probabilities, which rows were corrupted and how) goes to ``report_dir`` as
``truth-<batch_id>.parquet`` and ``report-<batch_id>.json``, never into the landing folder.
The files are staged and land after the report (:mod:`tasks.demo.staging`): a batch lands whole.
The same policy, prompts, settings and seed give the same files, byte for byte.

Broken responses (invalid UTF-8 or control characters) get the oracle's worst score and are
written without the broken characters, as a logging system that drops undecodable bytes would;
the report counts them (``broken_samples``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.config import GenerationSettings
from alignment.generation import generate
from alignment.models import preload_bitsandbytes
from tasks.demo import annotators as ann
from tasks.demo.malformed import corrupt_rows
from tasks.demo.oracle import is_broken, sentiment, strip_broken
from tasks.demo.settings import DegenerateFilter, SimulatorSettings
from tasks.demo.staging import land, staging_dir
from tasks.evaluation.metrics import distinct_n, ngrams, repetition_rate, word_tokens
from tasks.faults import fault_point

SOURCE = "alignflow-demo-simulator"
EPOCH = datetime(2025, 1, 1, tzinfo=timezone.utc)
LANDING_COLUMNS = {
    "pairwise": ["prompt", "response_a", "response_b", "choice"],
    "rating": ["prompt", "response", "score"],
    "binary": ["prompt", "response", "label"],
}
OPTIONAL_COLUMNS = ["annotator_id", "created_at", "source"]


@dataclass
class SimulationReport:
    """What one simulated batch wrote and what its labels can teach."""

    batch_id: str
    files: list[str]
    rows: dict[str, int]
    """Rows written per kind (malformed ones included)."""
    malformed: dict[str, int]
    """Corrupted rows per corruption; the data layer should quarantine exactly these."""
    malformed_share: float
    best_accuracy: float
    """Best expected accuracy of any model on the well-formed, non-tie pairwise labels."""
    pairwise_labels: int
    ties: int
    label_stats: list[dict]
    """Observed vs configured label rates per annotator and kind (see ``label_rate_stats``)."""
    prompts: int
    samples: int
    skipped_samples: int
    """Empty or duplicate responses left out of the items (rejected ones included)."""
    broken_samples: int
    """Responses with invalid UTF-8 or control characters: scored -1 by the oracle and written
    with those characters removed (a rising count means the policy drifts into byte noise)."""
    policy_sentiment: float
    """Mean oracle score of all sampled responses: the policy's sentiment this round."""
    rejected_samples: int = 0
    """Responses kept from the annotators: degenerate (loops, word stuffing; ``reject_degenerate``)
    or cut off at ``max_new_tokens`` (``reject_truncated``)."""
    kept_samples: int = 0
    """Responses that reached the annotators: not rejected, not blank, not a duplicate within their prompt."""
    paired_samples: int = 0
    """Kept samples on prompts (of one draw) that keep at least two: those a pair can come from."""
    draws: int = 1
    """Sampling draws: 1, plus one per extra draw made to reach ``min_kept_samples``."""
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def load_policy(path: str | Path):
    """(model, tokenizer) from an HF folder; a LoRA adapter folder is loaded onto its base and merged."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        preload_bitsandbytes()  # peft imports it when installed: without its Hub kernel lookup
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def generation_settings(settings: SimulatorSettings) -> GenerationSettings:
    """The sampling settings of the simulator as :class:`alignment.config.GenerationSettings`."""
    return GenerationSettings(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
        top_p=settings.top_p, batch_size=settings.generation_batch_size,
    )  # fmt: skip


def sample_responses(policy_path: str | Path, prompts: list[str], settings: SimulatorSettings,
                     seed: int) -> tuple[list[list[str]], list[list[bool]]]:
    """``samples_per_prompt`` sampled continuations for each prompt (prompt-major), and whether
    each ended with EOS (False: cut at ``max_new_tokens``)."""
    model, tokenizer = load_policy(policy_path)
    k = settings.samples_per_prompt
    with torch.inference_mode():
        result = generate(model, tokenizer, [p for p in prompts for _ in range(k)], generation_settings(settings), seed)
    ended = result.hit_eos.tolist()
    return ([result.texts[i * k : (i + 1) * k] for i in range(len(prompts))],
            [ended[i * k : (i + 1) * k] for i in range(len(prompts))])


def usable_count(texts: list[str]) -> int:
    """Responses of one prompt that become items: non-blank and distinct (``label_items``' rule)."""
    return sum(1 for i, t in enumerate(texts) if t.strip() and t not in texts[:i])


def paired_count(texts: list[str]) -> int:
    """Usable responses of one prompt when it has at least two (a pair can be built), else 0."""
    n = usable_count(texts)
    return n if n >= 2 else 0


def next_draw_size(floor: int, kept: int, drawn: int, cap: int) -> int:
    """Prompts to draw next so the batch reaches ``floor`` kept samples: the shortfall over the
    kept samples per prompt so far, 10% over, at most what ``cap`` (prompts in all) leaves; 0 once
    the floor or the cap is reached. With nothing kept yet, all the cap leaves."""
    room = max(cap - drawn, 0)
    if kept >= floor or room == 0:
        return 0
    if kept == 0:
        return room
    return min(room, int(np.ceil(1.1 * (floor - kept) * drawn / kept)))


def draw_seed(seed: int, draw: int) -> int:
    """Sampling seed of draw ``draw`` of a batch: ``seed`` itself for the first draw (so a batch
    without a floor is what it always was), an independent stream for each later one."""
    return seed if draw == 0 else int(np.random.SeedSequence([seed, 0xD2A3, draw]).generate_state(1)[0] >> 1)


def degenerate_reason(text: str, rules: DegenerateFilter) -> str | None:
    """Why ``text`` is degenerate under ``rules`` (a loop or word stuffing), or None.

    On lowercased word tokens w: seq-rep-3 = 1 − |unique trigrams| / |trigrams| above
    ``max_repeated_trigram_share``; distinct-1 = |unique words| / |words| below ``min_distinct1``
    (from ``min_words`` words on); a word of 4+ letters more than ``max_word_repeats`` times.
    """
    words = word_tokens(text)  # as the evaluation's distinct-n and repeated-trigram figures read a response
    counts = Counter(w for w in words if len(w) >= 4 and w.isalpha())
    if counts and max(counts.values()) > rules.max_word_repeats:
        word, n = counts.most_common(1)[0]
        return f"'{word}' {n} times"
    if len(words) < rules.min_words:
        return None
    if (rep3 := repetition_rate([words], 3)) > rules.max_repeated_trigram_share:
        return f"repeated trigrams {rep3:.2f}"
    if (distinct1 := distinct_n([words], 1)) < rules.min_distinct1:
        return f"distinct-1 {distinct1:.2f}"
    return None


def frame_commonness(texts: list[str]) -> np.ndarray:
    """Per text, how much it repeats the batch's stock phrasing: the mean, over its distinct
    lowercased word bigrams, of the share of the batch's non-blank texts that contain that bigram
    (0 for a blank text or one without bigrams). A text made of frames every sample uses
    ("it 's a good movie") scores high; a text in its own words scores near 1/len(texts)."""
    grams = [set(ngrams(word_tokens(t), 2)) if t.strip() else set() for t in texts]
    docs = sum(1 for t in texts if t.strip())
    counts = Counter(g for s in grams for g in s)
    return np.array([float(np.mean([counts[g] for g in s])) / docs if s else 0.0 for s in grams])


def label_items(
    prompts: list[str], responses: list[list[str]], scores: list[np.ndarray], settings: SimulatorSettings,
    rng: np.random.Generator, commonness: list[np.ndarray] | None = None,
) -> tuple[pd.DataFrame, int]:
    """Truth table of all labels (before corruption) and the number of skipped samples.

    One kind per prompt (by ``kind_shares``); only non-blank, distinct responses become items;
    each item is labelled by ``labels_per_item`` distinct annotators drawn by weight. ``commonness``
    (per prompt, per sample; :func:`frame_commonness`) steers the informative pairs when
    ``settings.novelty_weight`` is set.
    """
    kinds = list(settings.kind_shares)
    shares = np.array([settings.kind_shares[k] for k in kinds], np.float64)
    team = settings.annotators
    weights = np.array([a.weight for a in team]) / sum(a.weight for a in team)
    per_item = min(settings.labels_per_item, len(team))
    rows, skipped = [], 0
    for n, (prompt, texts, s) in enumerate(zip(prompts, responses, scores, strict=True)):
        kind = kinds[int(rng.choice(len(kinds), p=shares / shares.sum()))]
        keep = [i for i, t in enumerate(texts) if t.strip() and t not in texts[:i]]
        skipped += len(texts) - len(keep)
        texts, s = [texts[i] for i in keep], s[keep]
        common = None if commonness is None else commonness[n][keep]
        if kind == "pairwise":
            items = [(i, j, how) if rng.random() < 0.5 else (j, i, how)
                     for i, j, how in ann.select_pairs(s, settings, rng, common)]
        else:
            items = [(i, None, "sample") for i in range(len(texts))]
        for i, j, how in items:
            for a_idx in rng.choice(len(team), size=per_item, replace=False, p=weights):
                who = team[int(a_idx)]
                row = {"kind": kind, "prompt": prompt, "annotator_id": who.id, "spammer": who.spammer, "item": how}
                if kind == "pairwise":
                    p_a = float(ann.preference_probability(s[i : i + 1], s[j : j + 1], who)[0])
                    tie = not who.spammer and abs(s[i] - s[j]) <= settings.tie_threshold
                    choice = "tie" if tie else ("a" if rng.random() < p_a else "b")
                    row |= {"response_a": texts[i], "response_b": texts[j], "choice": choice,
                            "s_a": s[i], "s_b": s[j], "p_a": p_a}  # fmt: skip
                elif kind == "rating":
                    probs = ann.rating_probabilities(s[i : i + 1], who, settings.rating_scale)[0]
                    levels = np.arange(settings.rating_scale[0], settings.rating_scale[1] + 1)
                    mean = float(probs @ levels)
                    row |= {"response": texts[i], "score": int(rng.choice(levels, p=probs)), "s": s[i],
                            "score_mean": mean, "score_var": float(probs @ (levels - mean) ** 2)}  # fmt: skip
                else:
                    p_up = float(ann.thumbs_up_probability(s[i : i + 1], who)[0])
                    row |= {"response": texts[i], "label": bool(rng.random() < p_up), "s": s[i], "p_up": p_up}
                rows.append(row)
    return pd.DataFrame(rows), skipped


def _assign_files(truth: pd.DataFrame, settings: SimulatorSettings, batch_id: str) -> pd.DataFrame:
    files, formats, n = [], [], 0
    for kind in sorted(truth["kind"].unique()):
        count = int((truth["kind"] == kind).sum())
        for start in range(0, count, settings.rows_per_file):
            fmt = settings.formats[n % len(settings.formats)]
            size = min(settings.rows_per_file, count - start)
            files += [f"{batch_id}-{kind}-{start // settings.rows_per_file:03d}.{fmt}"] * size
            formats += [fmt] * size
            n += 1
    truth = truth.sort_values("kind", kind="stable", ignore_index=True).assign(file=files, format=formats)
    return truth.assign(file_row=truth.groupby("file").cumcount())


def _write(frame: pd.DataFrame, path: Path, fmt: str) -> None:
    # landing globs never match a half-written file; a unique name: two writers never share one
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    if fmt == "jsonl":
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    elif fmt == "csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def simulate_feedback(
    policy_path: str | Path,
    prompts: list[str],
    settings: SimulatorSettings,
    landing_dir: str | Path,
    *,
    batch_id: str,
    report_dir: str | Path | None = None,
    seed: int | None = None,
    start_time: datetime | None = None,
) -> SimulationReport:
    """Simulate one feedback batch on ``policy_path`` and write it into ``landing_dir``.

    ``prompts`` is the pool to draw from (``prompts_per_batch`` of them, without replacement
    when the pool is large enough; with ``min_kept_samples``, further draws until that many
    samples pass the filters, counted as ``floor_counts`` says, or ``max_prompts_per_batch``
    prompts are drawn); ``seed`` defaults to ``settings.seed`` (give each round its
    own); ``start_time`` (default 2025-01-01 UTC) is when the batch's labelling began, and rows
    get ``created_at`` within the following hour. Raises FileExistsError if the batch's files
    already exist (a batch is written once), ValueError on an empty prompt pool.
    """
    if not prompts:
        raise ValueError("simulate_feedback needs a non-empty prompt pool")
    landing = Path(landing_dir)
    landing.mkdir(parents=True, exist_ok=True)
    if any(landing.glob(f"{batch_id}-*")):
        raise FileExistsError(f"landing folder {landing} already holds files of batch {batch_id!r}")
    seed = settings.seed if seed is None else seed
    rng = np.random.default_rng([seed, 0x5EED])
    timer = {"start": time.monotonic()}
    pool = list(dict.fromkeys(prompts))
    take = rng.choice(len(pool), size=settings.prompts_per_batch, replace=settings.prompts_per_batch > len(pool))
    drawn: list[str] = []
    responses: list[list[str]] = []  # as sampled: the oracle scores these
    shown: list[list[str]] = []  # what the annotators may see: broken bytes stripped, rejected samples blanked
    rejected = kept = paired = draws = 0
    used = np.zeros(len(pool), bool)
    while len(take):
        texts, ended = sample_responses(policy_path, [pool[int(i)] for i in take], settings, draw_seed(seed, draws))
        blanked, n_rejected = filter_samples(texts, ended, settings)
        drawn += [pool[int(i)] for i in take]
        responses, shown = responses + texts, shown + blanked
        rejected, kept, draws = rejected + n_rejected, kept + sum(map(usable_count, blanked)), draws + 1
        paired += sum(map(paired_count, blanked))
        used[take] = True
        if settings.min_kept_samples is None:
            break
        counted = paired if settings.floor_counts == "paired" else kept
        size = next_draw_size(settings.min_kept_samples, counted, len(drawn), settings.max_prompts_per_batch)
        take = _more_prompts(used, size, np.random.default_rng([seed, 0x5EED, draws]))
    timer["sampled"] = time.monotonic()
    scores = sentiment([t for texts in responses for t in texts]).reshape(len(drawn), settings.samples_per_prompt)
    broken = sum(is_broken(t) for texts in responses for t in texts)
    responses = shown
    commonness = None
    if settings.novelty_weight:
        flat = frame_commonness([t for texts in responses for t in texts])
        k = settings.samples_per_prompt
        commonness = [flat[i * k : (i + 1) * k] for i in range(len(drawn))]
    truth, skipped = label_items(drawn, responses, list(scores), settings, rng, commonness)
    if truth.empty:
        raise ValueError(f"batch {batch_id}: the policy produced no usable response for {len(drawn)} prompts")
    offsets = np.sort(rng.uniform(0, 3600, len(truth)))
    begin = start_time or EPOCH
    truth["created_at"] = [(begin + timedelta(seconds=float(o))).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for o in offsets]
    truth["source"] = SOURCE
    truth = _assign_files(truth, settings, batch_id)
    truth = corrupt_rows(truth, settings.malformed_share, settings.rating_scale, rng)

    # Staged, reported, then landed (tasks/demo/staging.py): a killed process never leaves part
    # of a batch in the landing folder without its report.
    stage = staging_dir(report_dir, batch_id) if report_dir is not None else landing.parent / f".staging-{batch_id}"
    shutil.rmtree(stage, ignore_errors=True)  # a batch staged by a killed process before its report
    stage.mkdir(parents=True)
    files = []
    for name, rows in truth.groupby("file", sort=True):
        kind, fmt = rows["kind"].iloc[0], rows["format"].iloc[0]
        _write(rows[LANDING_COLUMNS[kind] + OPTIONAL_COLUMNS].reset_index(drop=True), stage / name, fmt)
        files.append(str(landing / name))
    timer["written"] = time.monotonic()

    report = _report(truth, batch_id, files, len(drawn), scores, skipped, broken, timer)
    report.rejected_samples, report.kept_samples, report.draws = rejected, kept, draws
    report.paired_samples = paired
    if report_dir is not None:
        out = Path(report_dir)
        # corrupted cells mix types (a word in the label column): store those columns as text
        mixed = {c: "string" for c in ("choice", "label", "score") if c in truth and truth[c].dtype == object}
        tmp = out / f".truth-{batch_id}.parquet.tmp"
        truth.astype(mixed).to_parquet(tmp, index=False)
        os.replace(tmp, out / f"truth-{batch_id}.parquet")
        fault_point("simulate:before-report")
        tmp = out / f".report-{batch_id}.json.tmp"
        tmp.write_text(json.dumps(report.to_dict(), indent=2))
        os.replace(tmp, out / f"report-{batch_id}.json")  # from here the batch lands, even after a kill
        fault_point("simulate:before-landing")
    land(stage, landing)
    return report


def filter_samples(responses: list[list[str]], ended: list[list[bool]],
                   settings: SimulatorSettings) -> tuple[list[list[str]], int]:
    """(responses as the annotators may see them, rejected count): broken bytes stripped (exports
    carry what a person saw; the low score they earned stays), rejected samples blanked
    (``label_items`` skips them like empty ones)."""
    responses = [[strip_broken(t) if is_broken(t) else t for t in texts] for texts in responses]
    if settings.reject_degenerate is None and not settings.reject_truncated:
        return responses, 0
    flags = [[(settings.reject_truncated and not done)
              or (settings.reject_degenerate is not None
                  and degenerate_reason(t, settings.reject_degenerate) is not None)
              for t, done in zip(texts, ends, strict=True)] for texts, ends in zip(responses, ended, strict=True)]
    blanked = [["" if bad else t for t, bad in zip(texts, f, strict=True)] for texts, f in zip(responses, flags, strict=True)]
    return blanked, sum(map(sum, flags))


def _more_prompts(used: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` pool indices for an extra draw: unused prompts first (without replacement), then,
    once the pool is used up, any prompt again (it gets new samples under the draw's seed)."""
    fresh = np.flatnonzero(~used)
    if size <= len(fresh):
        return rng.choice(fresh, size=size, replace=False)
    return np.concatenate([rng.permutation(fresh), rng.choice(len(used), size=size - len(fresh), replace=True)])


def _report(truth, batch_id, files, n_prompts, scores, skipped, broken, timer) -> SimulationReport:
    clean = truth[truth["malformed"].isna()]
    # a batch may hold no pairwise row at all (every sample rejected before the annotators)
    choice = clean["choice"] if "choice" in clean else pd.Series(None, index=clean.index, dtype=object)
    pairwise = clean["kind"] == "pairwise"
    pairs = clean[pairwise & (choice != "tie")]
    bad = truth["malformed"].dropna().value_counts()
    return SimulationReport(
        batch_id=batch_id,
        files=files,
        rows={k: int(v) for k, v in truth["kind"].value_counts().sort_index().items()},
        malformed={k: int(v) for k, v in bad.sort_index().items()},
        malformed_share=float(truth["malformed"].notna().mean()),
        best_accuracy=ann.best_accuracy(pairs["p_a"].to_numpy()) if len(pairs) else float("nan"),
        pairwise_labels=len(pairs),
        ties=int((pairwise & (choice == "tie")).sum()),
        label_stats=ann.label_rate_stats(truth),
        prompts=n_prompts,
        samples=int(scores.size),
        skipped_samples=skipped,
        broken_samples=broken,
        policy_sentiment=float(scores.mean()),
        seconds={
            "sample": round(timer["sampled"] - timer["start"], 2),
            "label_and_write": round(timer["written"] - timer["sampled"], 2),
        },
    )
