"""The demo's offline preference set (issue 15): human continuations of train-split review
beginnings, labelled by the simulated annotators, built through the pipeline's builder, cached,
deterministic under its seed, and never holding a held-out prompt."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from tasks.data.extra_pairs import check_extra_pairs
from tasks.data.keys import assign_splits, hash64, prompt_keys
from tasks.data.settings import IngestSettings, PreferenceSettings
from tasks.demo.corpus import corpus_from_texts
from tasks.demo.offline_feedback import build_offline_set, continuation, offline_items
from tasks.demo.settings import CorpusSettings, DemoSettings, OfflineFeedbackSettings, PromptSettings
from tests.tiny_models import make_tiny_model
from tests.unit.test_demo_corpus import review_sample


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tok"), "gpt2")  # word-level: one token per word


def _splits(prompts: list[str], prefs: PreferenceSettings) -> np.ndarray:
    return assign_splits(hash64(prompt_keys(prompts, np.zeros(len(prompts), bool))), prefs.splits.train,
                         prefs.splits.validation, prefs.split_salt)


def test_continuation_is_the_rest_of_the_review_cut_at_a_word_boundary(tokenizer_folder):
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    doc = "The film is wonderful from start to finish ."
    assert continuation(doc, "The film", tok, 24) == " is wonderful from start to finish ."
    assert continuation(doc, "The film", tok, 3) == " is wonderful from"
    assert continuation("The film", "The film", tok, 3) is None


def test_offline_items_hold_only_train_split_prompts_with_their_own_continuation_first(tokenizer_folder):
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    docs, prefs = review_sample(300), PreferenceSettings()
    prompts, responses = offline_items(docs, tok, PromptSettings(), prefs, 4, 3, np.random.default_rng(0))
    assert len(prompts) > 100 and len(set(prompts)) == len(prompts)
    assert (_splits(prompts, prefs) == 0).all()  # no validation or test prompt, by the builder's own hash
    by_prompt = {}
    for d in docs:
        by_prompt.setdefault(next((p for p in prompts if d.startswith(p + " ")), None), d)
    for prompt, texts in zip(prompts, responses, strict=True):
        assert len(texts) == 3
        assert all(t.startswith(" ") and len(t.split()) <= 4 for t in texts)
        assert any(d.startswith(prompt + texts[0]) for d in docs)  # its own review goes on with it
    # the same seed draws the same items; another seed other partners
    again = offline_items(docs, tok, PromptSettings(), prefs, 4, 3, np.random.default_rng(0))
    other = offline_items(docs, tok, PromptSettings(), prefs, 4, 3, np.random.default_rng(1))
    assert again == (prompts, responses)
    assert other[0] == prompts and other[1] != responses


def test_offline_set_is_built_once_deterministic_under_its_seed_and_passes_the_extra_pairs_check(
        tokenizer_folder, tmp_path):
    corpus = corpus_from_texts(review_sample(900), CorpusSettings(heldout_fraction=0.1))
    prefs, data = PreferenceSettings(), IngestSettings()
    settings = DemoSettings(offline=OfflineFeedbackSettings(enabled=True, seed=0))

    def build(where, s=settings):
        return build_offline_set(s, tokenizer_folder, data, prefs, cache_dir=tmp_path / where, corpus=corpus)

    first, second = build("a"), build("b")
    assert not first.cached and build("a").cached
    assert (first.digest, first.pairs) == (second.digest, second.pairs) and first.pairs > 50
    pd.testing.assert_frame_equal(pd.read_parquet(first.path), pd.read_parquet(second.path))
    pairs = pd.read_parquet(first.path)
    assert set(pairs["split"]) == {"train"} and (_splits(pairs["prompt"].tolist(), prefs) == 0).all()
    assert not set(pairs["prompt"]) & set(corpus.heldout)
    checked = check_extra_pairs([first.path], prefs)  # the pipeline's own check accepts it
    assert checked is not None and checked.pairs == first.pairs
    reseeded = build("c", settings.model_copy(update={"offline": OfflineFeedbackSettings(enabled=True, seed=1)}))
    assert reseeded.digest != first.digest


def test_demo_offline_refuses_a_configured_reward_backbone_when_the_config_loads(tmp_path):
    from pydantic import ValidationError

    from tasks.config import PipelineConfig

    raw = {"pipeline": {"home": str(tmp_path)}, "demo": {"offline": {"enabled": True}},
           "model": {"reward": {"name_or_path": str(tmp_path / "rm")}}}
    with pytest.raises(ValidationError, match="model.reward names another starting point"):
        PipelineConfig.model_validate(raw)
    raw["demo"]["offline"]["enabled"] = False  # either one alone is fine
    assert PipelineConfig.model_validate(raw).model.reward is not None


def test_a_sampled_offline_set_holds_the_base_models_own_samples_and_follows_its_weights(
        tokenizer_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from tasks.demo.offline_feedback import offline_items as human_items

    corpus = corpus_from_texts(review_sample(600), CorpusSettings(heldout_fraction=0.1))
    prefs, data = PreferenceSettings(), IngestSettings()
    human = DemoSettings(offline=OfflineFeedbackSettings(enabled=True, max_prompts=60))
    sampled = human.model_copy(update={"offline": human.offline.model_copy(update={"responses": "sampled"})})

    def build(where, s, model=tokenizer_folder):
        return build_offline_set(s, model, data, prefs, cache_dir=tmp_path / where, corpus=corpus)

    first, again = build("a", sampled), build("b", sampled)
    assert first.pairs > 10 and (first.digest, first.pairs) == (again.digest, again.pairs)  # seeded sampling
    pairs = pd.read_parquet(first.path)
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    _, continuations = human_items(list(corpus.train), tok, human.prompts, prefs, 24, 4, np.random.default_rng(0))
    written = {t for texts in continuations for t in texts}
    answers = set(pairs.chosen) | set(pairs.rejected)
    assert not answers & written  # the model's text, not the corpus's
    limit = sampled.simulator.max_new_tokens
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= limit for t in answers)
    assert build("h", human).digest != first.digest
    # other weights, the same tokenizer: another set (the cache key follows the model, not only its tokenizer)
    other = tmp_path / "other-model"
    shutil.copytree(tokenizer_folder, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v + 0.5 if v.dim() == 2 else v for k, v in weights.items()}, other / "model.safetensors")
    moved = build("a", sampled, other)
    assert not moved.cached and moved.digest != first.digest


def test_random_pairs_compares_more_pairs_of_the_same_texts(tokenizer_folder, tmp_path):
    corpus = corpus_from_texts(review_sample(600), CorpusSettings(heldout_fraction=0.1))
    settings = DemoSettings(offline=OfflineFeedbackSettings(enabled=True))

    def build(s, where):
        return build_offline_set(s, tokenizer_folder, IngestSettings(), PreferenceSettings(),
                                 cache_dir=tmp_path / where, corpus=corpus)

    every = settings.model_copy(update={"offline": settings.offline.model_copy(update={"random_pairs": 5})})
    few, many = build(settings, "a"), build(every, "b")
    assert many.digest != few.digest and many.pairs > 1.3 * few.pairs
    texts = {k: set(pd.concat([pd.read_parquet(b.path).chosen, pd.read_parquet(b.path).rejected]))
             for k, b in (("few", few), ("many", many))}
    assert texts["few"] <= texts["many"]  # the same responses, compared more often


def test_response_tokens_cuts_the_human_continuations_shorter(tokenizer_folder, tmp_path):
    corpus = corpus_from_texts(review_sample(600), CorpusSettings(heldout_fraction=0.1))
    short = DemoSettings(offline=OfflineFeedbackSettings(enabled=True, response_tokens=3))
    built = build_offline_set(short, tokenizer_folder, IngestSettings(), PreferenceSettings(),
                              cache_dir=tmp_path, corpus=corpus)
    pairs = pd.read_parquet(built.path)
    assert max(len(t.split()) for t in pd.concat([pairs.chosen, pairs.rejected])) == 3  # word-level tokenizer
