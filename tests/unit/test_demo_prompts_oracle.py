"""Demo prompts (word-boundary prefixes, data-layer splits) and the VADER oracle."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.data.keys import assign_splits, hash64, prompt_keys
from tasks.data.settings import PreferenceSettings
from tasks.demo.oracle import reward_fn, sentiment
from tasks.demo.prompts import build_prompts, pretraining_heldout_prompts, prompt_from_document, write_prompts
from tasks.demo.settings import PromptSettings, TokenizerSettings
from tasks.demo.tokenizer import train_tokenizer
from tests.unit.test_demo_corpus import review_sample


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(review_sample(600), TokenizerSettings(vocab_size=400))


def test_prompts_are_word_prefixes_within_token_bounds(tokenizer):
    settings = PromptSettings(min_tokens=2, max_tokens=6, min_words=2, min_continuation_words=2)
    docs = review_sample(300)
    frame = build_prompts(docs, tokenizer, settings)
    assert len(frame) > 20 and frame["prompt"].is_unique and frame["prompt_id"].is_unique
    for prompt in frame["prompt"]:
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert 2 <= n <= 6 and len(prompt.split()) >= 2
        source = next(d for d in docs if d.startswith(prompt + " "))
        assert len(source.split()) - len(prompt.split()) >= 2
    assert frame.equals(build_prompts(list(reversed(docs)), tokenizer, settings))


def test_prompt_splits_agree_with_the_data_layer(tokenizer):
    splits = PreferenceSettings(split_salt="demo-salt")
    frame = build_prompts(review_sample(300), tokenizer, PromptSettings(), splits)
    key_hash = hash64(prompt_keys(frame["prompt"].tolist(), np.zeros(len(frame), bool)))
    codes = assign_splits(key_hash, splits.splits.train, splits.splits.validation, "demo-salt")
    assert frame["split"].tolist() == [["train", "validation", "test"][c] for c in codes]
    assert set(frame["split"]) == {"train", "validation", "test"}


def test_pretraining_prompts_are_held_out_split_only_and_not_the_tables(tokenizer):
    """The evaluation-only prompts of ``demo.pretraining_heldout_prompts``: cut from other documents
    exactly as the table's, kept only where the data layer's hash puts them in validation or test
    (so no preference set can ever train on one), none equal to a table prompt, in prompt_id order."""
    splits = PreferenceSettings()
    docs = review_sample(600)
    table = build_prompts(docs[:300], tokenizer, PromptSettings(), splits)
    frame = pretraining_heldout_prompts(docs[300:] + docs[:20], tokenizer, PromptSettings(), table, splits)
    everything = build_prompts(docs[300:] + docs[:20], tokenizer, PromptSettings(), splits)
    expected = everything[(everything["split"] != "train") & ~everything["prompt"].isin(set(table["prompt"]))]
    assert len(frame) > 20 and frame["prompt"].tolist() == expected["prompt"].tolist()
    assert set(frame["split"]) == {"validation", "test"} and not set(frame["prompt"]) & set(table["prompt"])
    codes = assign_splits(hash64(prompt_keys(frame["prompt"].tolist(), np.zeros(len(frame), bool))),
                          splits.splits.train, splits.splits.validation, splits.split_salt)
    assert (codes != 0).all()
    assert frame["prompt_id"].is_monotonic_increasing and list(frame.columns) == list(table.columns)
    shared = set(everything.loc[everything["split"] != "train", "prompt"]) & set(table["prompt"])
    assert shared  # the 20 documents the table also cut from: their held-out prompts are left out


def test_prompt_needs_a_continuation(tokenizer):
    settings = PromptSettings(min_continuation_words=3)
    assert prompt_from_document("Great fun.", tokenizer, settings) is None
    assert prompt_from_document("A film of rare and quiet beauty.", tokenizer, settings) is not None


def test_write_prompts_per_split(tokenizer, tmp_path):
    frame = build_prompts(review_sample(300), tokenizer, PromptSettings())
    write_prompts(frame, tmp_path)
    import pandas as pd

    parts = [pd.read_parquet(tmp_path / f"prompts-{s}.parquet") for s in ("train", "validation", "test")]
    assert sum(len(p) for p in parts) == len(pd.read_parquet(tmp_path / "prompts.parquet")) == len(frame)


def test_oracle_scores_sentiment_of_the_response_only():
    scores = sentiment(["a wonderful, moving film", "a dull and tedious mess", "", "   ", "the film"])
    assert scores[0] > 0.5 and scores[1] < -0.5
    assert scores[2] == scores[3] == scores[4] == 0.0
    assert reward_fn(["I hate it but", "I love it but"], ["it is great", "it is great"]) == [scores_ := sentiment(["it is great"])[0], scores_]
    with pytest.raises(TypeError, match="response 1"):
        sentiment(["fine", None])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        reward_fn(["a", "b"], ["c"])
