"""An offline preference set for the demo's reward model: comparisons that cost no generation.

A team that trains a reward model rarely starts from one round's feedback: it has a backlog of
labelled comparisons. The demo's backlog is made from the corpus's own **train** documents (the
ones the base model was pretrained on; the demo's prompts come from the held-out documents):
each document gives a prompt cut exactly as the demo cuts its prompts
(:func:`tasks.demo.prompts.prompt_from_document`) and its real human continuation, cut at a word
boundary to the simulator's ``max_new_tokens`` tokens, as a policy's response is. Every prompt
gets ``samples_per_prompt`` responses: its own continuation and the continuations of other,
randomly drawn train documents. The demo's simulated annotators then label them exactly as they
label a round (:func:`tasks.demo.simulator.label_items`: the same oracle, annotators, label kinds
and pair selection), and the pipeline's own validation and builder turn the labels into pairs
(:func:`tasks.data.export.build_dataset`). No sampling from a model is involved, so the cost is
the labelling and the reward model's extra training steps.

With ``responses: sampled`` the responses are instead the base model's own samples for those
prompts, drawn and filtered as the simulator draws a round's (unfinished and degenerate samples
never reach the annotators). That costs generation, and it is the text the judge is later asked
about: on one fixed held-out set of eight rounds' labels, 10,076 sampled pairs put the judge 0.053
under the Bayes ceiling where 14,919 human pairs left it 0.076 under (benchmarks/RESULTS.md, issue
15 point 1). ``response_tokens`` cuts human continuations shorter than a policy's response.

Only prompts whose hash puts them in the ``train`` split (:func:`tasks.data.keys.assign_splits`,
the split every preference dataset uses) are kept, so no offline prompt can be a validation or
test prompt of any round. The set is cached under ``<cache>/offline-<digest>/`` (Parquet and
JSON; the digest covers the corpus checksum, the tokenizer, and every setting that shapes the
set, and the base model's weights when it is sampled), so only the first build pays.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from alignment.config import json_digest
from tasks.data.keys import assign_splits, hash64, prompt_keys
from tasks.data.settings import IngestSettings, PreferenceSettings
from tasks.demo.corpus import Corpus, demo_cache_dir, load_corpus, sha256_file
from tasks.demo.oracle import sentiment
from tasks.demo.prompts import prompt_from_document
from tasks.demo.settings import DemoSettings, PromptSettings, SimulatorSettings
from tasks.demo.simulator import (
    LANDING_COLUMNS,
    OPTIONAL_COLUMNS,
    filter_samples,
    label_items,
    sample_responses,
)
from tasks.progress import run_logger

SOURCE = "alignflow-demo-offline"
FORMAT_VERSION = 1
"""Bumped when the way the set is made changes (part of the cache digest)."""


@dataclass(frozen=True)
class OfflineSet:
    """A built (or cached) offline preference set."""

    path: str
    """``pairs-train.parquet`` of the set: the builder's pair schema, every row in split ``train``."""
    digest: str
    """Content digest of the pairs (the builder's dataset digest)."""
    pairs: int
    prompts: int
    labels: int
    """Annotator labels behind the pairs (every kind)."""
    build_seconds: float
    cached: bool

    def to_dict(self) -> dict:
        return asdict(self)


def continuation(document: str, prompt: str, tokenizer, max_tokens: int) -> str | None:
    """The words of ``document`` after ``prompt`` (with its leading space, as a sampled response
    starts), cut at a word boundary to at most ``max_tokens`` tokens; None when no word fits."""
    words = document[len(prompt):].split(" ")
    words = [w for w in words if w]
    best = None
    for k in range(1, len(words) + 1):
        text = " " + " ".join(words[:k])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_tokens:
            break
        best = text
    return best


def offline_items(documents: list[str], tokenizer, prompts: PromptSettings, splits: PreferenceSettings,
                  max_tokens: int, samples_per_prompt: int, rng: np.random.Generator,
                  max_prompts: int | None = None) -> tuple[list[str], list[list[str]]]:
    """(prompts, responses per prompt) of the offline set: one prompt per document whose prompt
    falls in the ``train`` split, its own continuation first, then ``samples_per_prompt - 1``
    continuations of other documents drawn at random. ``max_prompts`` keeps a random subset."""
    cut: dict[str, str] = {}
    for doc in documents:
        prompt = prompt_from_document(doc, tokenizer, prompts)
        if prompt is None or prompt in cut:
            continue
        if (text := continuation(doc, prompt, tokenizer, max_tokens)) is not None:
            cut[prompt] = text
    keys = list(cut)
    split = assign_splits(hash64(prompt_keys(keys, np.zeros(len(keys), bool))), splits.splits.train,
                          splits.splits.validation, splits.split_salt)
    keys = sorted(k for k, s in zip(keys, split, strict=True) if s == 0)
    if max_prompts is not None and max_prompts < len(keys):
        keys = sorted(keys[i] for i in rng.choice(len(keys), size=max_prompts, replace=False))
    pool = [cut[k] for k in keys]
    if len(pool) < samples_per_prompt:
        raise ValueError(f"only {len(pool)} train-split documents give a prompt; need {samples_per_prompt}")
    responses = []
    for i in range(len(keys)):
        others = rng.choice(len(pool) - 1, size=samples_per_prompt - 1, replace=False)
        responses.append([pool[i], *(pool[j + (j >= i)] for j in others)])
    return keys, responses


def offline_digest(settings: DemoSettings, corpus_checksum: str, model_digest: str,
                   preferences: PreferenceSettings) -> str:
    """Digest of everything that shapes the set (the cache key). ``model_digest`` identifies what the set
    takes from the base model: its tokenizer, and its weights too when the responses are sampled."""
    sim = settings.simulator
    return json_digest({
        "format": FORMAT_VERSION, "corpus": corpus_checksum, "tokenizer": model_digest,
        "prompts": settings.prompts.model_dump(mode="json"), "max_new_tokens": sim.max_new_tokens,
        "annotators": [a.model_dump(mode="json") for a in sim.annotators],
        "labelling": sim.model_dump(mode="json", include={"kind_shares", "labels_per_item", "informative_pairs",
                                                          "random_pairs", "tie_threshold", "rating_scale"}),
        "preferences": preferences.model_dump(mode="json"),
        # fields added later only when set away from their defaults: older sets keep their keys
        "offline": settings.offline.model_dump(mode="json", exclude={"enabled"} | {
            k for k, default in (("response_tokens", None), ("responses", "human"), ("random_pairs", None))
            if getattr(settings.offline, k) == default}),
    })[:16]  # fmt: skip


def label_offline(prompts: list[str], responses: list[list[str]], simulator: SimulatorSettings,
                  rng: np.random.Generator, shown: list[list[str]] | None = None) -> pd.DataFrame:
    """The simulated annotators' labels of the offline items (``simulator``'s labelling, no corruption).
    ``shown``: the responses as the annotators see them (rejected samples blanked), default ``responses``."""
    scores = sentiment([t for texts in responses for t in texts]).reshape(len(prompts), -1)
    truth, _ = label_items(prompts, shown or responses, list(scores), simulator, rng)  # no frame commonness
    truth["source"] = SOURCE
    return truth


def write_landing(truth: pd.DataFrame, folder: Path) -> list[Path]:
    """One Parquet file per kind in the landing schema (what the pipeline's ingest reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for kind, rows in truth.groupby("kind", sort=True):
        cols = LANDING_COLUMNS[kind] + [c for c in OPTIONAL_COLUMNS if c in rows]
        path = folder / f"offline-{kind}.parquet"
        rows[cols].reset_index(drop=True).to_parquet(path, index=False)
        files.append(path)
    return files


def build_offline_set(settings: DemoSettings, base_model_path: str | Path, data: IngestSettings,
                      preferences: PreferenceSettings, *, cache_dir: str | Path | None = None,
                      corpus: Corpus | None = None) -> OfflineSet:
    """Build (once) or load the demo's offline preference set (``settings.offline``; see the module
    docstring) with the base model's tokenizer and the pipeline's ``data`` and ``preferences`` settings.

    ``cache_dir`` defaults to the demo cache; ``corpus`` to the cached demo corpus (fetched once).
    The same corpus, tokenizer and settings give the same pairs. Raises ValueError when the
    builder makes no training pair.
    """
    from transformers import AutoTokenizer

    from tasks.data.export import build_dataset

    start = time.monotonic()
    cache = Path(cache_dir) if cache_dir is not None else demo_cache_dir(settings)
    corpus = corpus if corpus is not None else load_corpus(settings.corpus, demo_cache_dir(settings))
    model_digest = json_digest({n: (Path(base_model_path) / n).read_text()
                                for n in ("tokenizer.json",) if (Path(base_model_path) / n).exists()})
    if settings.offline.responses == "sampled":  # the responses come from the model's weights too
        model_digest = json_digest([model_digest, sha256_file(Path(base_model_path) / "model.safetensors")])
    key = offline_digest(settings, corpus.checksum, model_digest, preferences)
    offline = settings.offline
    folder = cache / f"offline-{key}"
    meta_path = folder / "offline.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return OfflineSet(**{**meta, "path": str(folder / "pairs-train.parquet"), "cached": True})
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    rng = np.random.default_rng([offline.seed, 0x0FF1])
    prompts, responses = offline_items(list(corpus.train), tokenizer, settings.prompts, preferences,
                                       offline.response_tokens or settings.simulator.max_new_tokens,
                                       offline.samples_per_prompt, rng,
                                       offline.max_prompts)
    # the round's simulator, with the set's own sample count (when sampled) and pair count (when labelled)
    sim = settings.simulator.model_copy(update={
        "samples_per_prompt": offline.samples_per_prompt,
        "random_pairs": settings.simulator.random_pairs if offline.random_pairs is None else offline.random_pairs})
    shown = None
    if offline.responses == "sampled":  # the base model's own text, drawn and filtered as a round's
        log, t0 = run_logger(), time.monotonic()
        log.info("offline set: sampling %d responses from the base model for %d prompts (once; then cached)",
                 len(prompts) * sim.samples_per_prompt, len(prompts))
        responses, ended = sample_responses(base_model_path, prompts, sim, offline.seed)
        log.info("offline set: sampled in %.0f s", time.monotonic() - t0)
        shown, _ = filter_samples(responses, ended, sim)
    truth = label_offline(prompts, responses, sim, rng, shown)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".offline-", dir=cache))
    try:
        landing = tmp / "landing"
        write_landing(truth, landing)
        out = tmp / "set"
        log = io.StringIO()
        code = build_dataset([str(landing)], out, data.model_copy(update={"quarantine_max_share": 1.0}),
                             preferences.model_copy(update={"min_pairs": 1}), stream=log)
        train = out / "pairs-train.parquet"
        if code != 0 or not train.exists():
            raise ValueError(f"the offline preference set could not be built: {log.getvalue().strip()}")
        pairs = pd.read_parquet(train)
        if (pairs["split"] != "train").any() or len(pairs) == 0:
            raise ValueError("the offline preference set holds no training pairs or pairs outside the train split")
        # the builder's source digest names the (temporary) landing files; the set's key names its source
        pairs["source_digest"] = f"offline-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        pairs.to_parquet(folder / "pairs-train.parquet", index=False)
        digest = json_digest(sorted(pairs["pair_id"].astype(str) + "\t" + pairs["chosen"] + "\t" + pairs["rejected"]
                                    + "\t" + pairs["weight"].astype(str)))[:16]
        meta = {"digest": digest, "pairs": len(pairs), "prompts": len(prompts), "labels": len(truth),
                "build_seconds": round(time.monotonic() - start, 1)}
        tmp_meta = folder / f".offline.json.{os.getpid()}"
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, meta_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OfflineSet(**meta, path=str(folder / "pairs-train.parquet"), cached=False)


__all__ = ["OfflineSet", "build_offline_set", "continuation", "label_offline", "offline_items"]
