"""The demo's prompt set: the first few words of held-out reviews.

Each held-out document gives at most one prompt: its first words, cut at a word boundary,
between ``min_tokens`` and ``max_tokens`` tokens long (the target length is drawn from a hash
of the document, so the set is deterministic), leaving at least ``min_continuation_words``
words of the review unwritten. Duplicates collapse to one prompt.

Splits come from the data layer's own function (:func:`tasks.data.keys.assign_splits` on the
whitespace-normalised prompt key), so a prompt is in the same split here as in every
preference dataset the pipeline builds from feedback on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.data.keys import assign_splits, hash64, hex16, prompt_keys
from tasks.data.settings import PreferenceSettings
from tasks.demo.settings import DemoSettings, PromptSettings

SPLIT_NAMES = np.array(["train", "validation", "test"])


def _target_tokens(document: str, settings: PromptSettings) -> int:
    digest = hashlib.sha256(f"prompt-length\x00{settings.seed}\x00{document}".encode()).digest()
    span = settings.max_tokens - settings.min_tokens + 1
    return settings.min_tokens + int.from_bytes(digest[:8], "big") % span


def prompt_from_document(document: str, tokenizer, settings: PromptSettings) -> str | None:
    """The longest word prefix of ``document`` within its drawn token budget, or None when no
    prefix meets ``min_words``/``min_tokens``/``max_tokens`` and leaves enough words to continue."""
    words = document.split(" ")
    budget = _target_tokens(document, settings)
    best = None
    for k in range(settings.min_words, len(words) - settings.min_continuation_words + 1):
        text = " ".join(words[:k])
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > budget:
            break
        if n >= settings.min_tokens:
            best = text
    return best


def build_prompts(
    documents: Sequence[str],
    tokenizer,
    settings: PromptSettings,
    splits: PreferenceSettings | None = None,
) -> pd.DataFrame:
    """Prompt table ``prompt_id, prompt, is_chat, split`` (ARCHITECTURE.md), sorted by prompt_id.

    ``splits`` gives the split fractions and salt (default: the data layer's defaults; pass
    the pipeline's ``preferences`` settings so both agree). Raises ValueError when no document
    yields a prompt.
    """
    splits = splits or PreferenceSettings()
    prompts = sorted({p for d in documents if (p := prompt_from_document(d, tokenizer, settings)) is not None})
    if not prompts:
        raise ValueError(f"no prompt could be cut from {len(documents)} documents with {settings}")
    key_hash = hash64(prompt_keys(prompts, np.zeros(len(prompts), bool)))
    split = assign_splits(key_hash, splits.splits.train, splits.splits.validation, splits.split_salt)
    frame = pd.DataFrame({
        "prompt_id": hex16(key_hash).to_pylist(),
        "prompt": prompts,
        "is_chat": False,
        "split": SPLIT_NAMES[split],
    })  # fmt: skip
    return frame.sort_values("prompt_id", ignore_index=True)


def write_prompts(frame: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write ``prompts.parquet`` and ``prompts-{split}.parquet`` into ``out_dir``; returns the first."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out / "prompts.parquet", index=False)
    for name in SPLIT_NAMES:
        frame[frame["split"] == name].to_parquet(out / f"prompts-{name}.parquet", index=False)
    return out / "prompts.parquet"


def _corpus_and_tokenizer(settings: DemoSettings, base_model_path: str | Path):
    """The cached corpus (fetched if it is not cached yet) and the base model's tokenizer."""
    from transformers import AutoTokenizer

    from tasks.demo.corpus import demo_cache_dir, load_corpus

    return load_corpus(settings.corpus, demo_cache_dir(settings)), AutoTokenizer.from_pretrained(base_model_path)


def demo_prompts(settings: DemoSettings, base_model_path: str | Path, splits: PreferenceSettings | None = None) -> pd.DataFrame:
    """The demo's prompt table from the cached corpus's held-out documents and the base model's
    tokenizer (see :func:`build_prompts`). Fetches the corpus if it is not cached yet."""
    corpus, tokenizer = _corpus_and_tokenizer(settings, base_model_path)
    return build_prompts(corpus.heldout, tokenizer, settings.prompts, splits)


def demo_pretraining_prompts(settings: DemoSettings, base_model_path: str | Path, table: pd.DataFrame,
                             splits: PreferenceSettings | None = None) -> pd.DataFrame:
    """:func:`pretraining_heldout_prompts` over the cached corpus's train documents (the base
    model's pretraining text) with the base model's tokenizer."""
    corpus, tokenizer = _corpus_and_tokenizer(settings, base_model_path)
    return pretraining_heldout_prompts(corpus.train, tokenizer, settings.prompts, table, splits)


def pretraining_heldout_prompts(documents: Sequence[str], tokenizer, settings: PromptSettings, table: pd.DataFrame,
                                splits: PreferenceSettings | None = None) -> pd.DataFrame:
    """Held-out prompts cut from the base model's pretraining ``documents``, for evaluation only.

    The same cut and split as the table's (:func:`build_prompts`), keeping the prompts whose split
    is ``validation`` or ``test`` and that are not already in ``table`` (the demo's own prompt
    table); sorted by ``prompt_id``, the table's columns. No train-split prompt is among them, so no
    preference pair of any round can hold one, nor the offline set (train-split prompts and
    continuations only). Raises ValueError when no document yields a prompt."""
    frame = build_prompts(documents, tokenizer, settings, splits)
    keep = (frame["split"] != "train") & ~frame["prompt"].isin(set(table["prompt"]))
    return frame[keep].reset_index(drop=True)
