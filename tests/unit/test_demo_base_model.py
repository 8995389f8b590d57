"""Demo base model: built once and cached, deterministic, learns, saved as an ordinary HF folder."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.demo.base_model import (
    base_model_digest,
    build_base_model,
    evaluate_loss,
    lr_at,
    make_model,
    pack,
)
from tasks.demo.corpus import corpus_from_texts
from tasks.demo.settings import CorpusSettings, PretrainSettings, tiny_demo_settings
from tasks.demo.tokenizer import encode_documents
from tests.unit.test_demo_corpus import review_sample


@pytest.fixture(scope="module")
def corpus():
    return corpus_from_texts(review_sample(1200), CorpusSettings(heldout_fraction=0.15))


def _settings(cache: Path, **pretrain):
    s = tiny_demo_settings(str(cache))
    return s.model_copy(update={"pretrain": s.pretrain.model_copy(update={"steps": 40, **pretrain})})


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus):
    settings = _settings(tmp_path_factory.mktemp("demo-cache"))
    return settings, build_base_model(settings, corpus=corpus, progress=False)


def test_second_build_comes_from_cache_with_the_same_digest(built, corpus):
    settings, first = built
    started = time.monotonic()
    again = build_base_model(settings, corpus=corpus, progress=False)
    assert time.monotonic() - started < 2.0
    assert again.cached and not first.cached
    assert (again.digest, again.path, again.heldout_loss) == (first.digest, first.path, first.heldout_loss)
    assert Path(first.path).name == f"base-{first.digest}"
    assert not [p for p in Path(first.path).parent.iterdir() if p.name.startswith(".base-")]  # no leftovers


def test_digest_covers_settings_and_corpus_but_not_threads(built, corpus):
    settings, info = built
    assert base_model_digest(settings, corpus.checksum) == info.digest
    more_steps = _settings(Path(settings.cache_dir), steps=41)
    assert base_model_digest(more_steps, corpus.checksum) != info.digest
    assert base_model_digest(settings, "0" * 64) != info.digest
    threads = _settings(Path(settings.cache_dir), threads=1)
    assert base_model_digest(threads, corpus.checksum) == info.digest


def test_build_is_deterministic(built, corpus, tmp_path):
    settings, info = built
    other = build_base_model(settings.model_copy(update={"cache_dir": str(tmp_path)}), corpus=corpus, progress=False)
    assert other.digest == info.digest and not other.cached
    a = (Path(info.path) / "model.safetensors").read_bytes()
    b = (Path(other.path) / "model.safetensors").read_bytes()
    assert a == b


def test_pretraining_lowers_heldout_loss(built, corpus):
    settings, info = built
    tok = AutoTokenizer.from_pretrained(info.path)
    rows = pack(encode_documents(tok, corpus.heldout), settings.model.context_length)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(settings.pretrain.seed)
    untrained = make_model(settings.model, len(tok), special, 0.0)
    before, count = evaluate_loss(untrained, rows, tok.bos_token_id, 16, "fp32")
    assert count > 0 and before == pytest.approx(math.log(len(tok)), abs=0.5)  # near uniform at init
    trained = AutoModelForCausalLM.from_pretrained(info.path)
    after, _ = evaluate_loss(trained, rows, tok.bos_token_id, 16, "fp32")
    assert after < before - 1.0, (before, after)
    assert info.heldout_perplexity == pytest.approx(math.exp(info.heldout_loss), rel=1e-3)


def test_folder_loads_and_generates_clean_text(built):
    _, info = built
    folder = Path(info.path)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "build.json"} <= {
        p.name for p in folder.iterdir()
    }
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    suppressed = set(model.generation_config.suppress_tokens)
    assert {tok.bos_token_id, tok.pad_token_id} <= suppressed and tok.eos_token_id not in suppressed
    enc = tok(["The film", "This movie is"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=12)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(t.isascii() and t.isprintable() for t in texts), texts


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = PretrainSettings(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(i, cfg) >= lr_at(i + 1, cfg) for i in range(10, 100))


def test_pack_concatenates_and_drops_the_tail():
    rows = pack([[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 9, 2]], 5)
    assert rows.tolist() == [[1, 5, 6, 2, 1], [7, 2, 1, 8, 9]]
    with pytest.raises(ValueError, match="do not fill"):
        pack([[1, 2]], 5)


def test_gpt2_family_builds_too(corpus, tmp_path):
    s = _settings(tmp_path, steps=5)
    s = s.model_copy(update={"model": s.model.model_copy(update={"architecture": "gpt2"})})
    info = build_base_model(s, corpus=corpus, progress=False)
    model = AutoModelForCausalLM.from_pretrained(info.path)
    assert model.config.model_type == "gpt2" and model.config.n_positions == s.model.context_length
    assert math.isfinite(info.heldout_loss)


def test_eager_attention_and_the_fused_optimizer_build_another_model_whose_folder_loads_with_the_default(
        built, corpus, tmp_path):
    settings, info = built
    fast = _settings(tmp_path, attention="eager", fused_optimizer=True)
    digest = base_model_digest(fast, corpus.checksum)
    assert digest != info.digest  # other rounding, another model: another cache key
    for field, value in (("attention", "eager"), ("fused_optimizer", True)):
        assert base_model_digest(_settings(tmp_path, **{field: value}), corpus.checksum) not in (digest, info.digest)
    other = build_base_model(fast, corpus=corpus, progress=False)
    assert other.digest == digest and math.isfinite(other.heldout_loss)
    assert abs(other.heldout_loss - info.heldout_loss) < 0.05 * info.heldout_loss  # the same recipe, learnt alike
    a = (Path(info.path) / "model.safetensors").read_bytes()
    assert (Path(other.path) / "model.safetensors").read_bytes() != a
    model = AutoModelForCausalLM.from_pretrained(other.path)
    assert model.config._attn_implementation == "sdpa"  # the build's kernel choice is not saved
