"""The feedback simulator on a tiny model built offline: files, truth, determinism, data-layer ingest."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.data.landing import ingest
from tasks.data.settings import IngestSettings
from tasks.demo.base_model import build_base_model
from tasks.demo.corpus import corpus_from_texts
from tasks.demo.oracle import BROKEN_SCORE, is_broken, sentiment
from tasks.demo.prompts import build_prompts
from tasks.demo.settings import CorpusSettings, tiny_demo_settings
from tasks.demo.simulator import simulate_feedback
from tests.unit.test_demo_corpus import review_sample


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    settings = tiny_demo_settings(str(tmp_path_factory.mktemp("demo-cache")))
    corpus = corpus_from_texts(review_sample(1200), CorpusSettings(heldout_fraction=0.15))
    info = build_base_model(settings, corpus=corpus, progress=False)
    from transformers import AutoTokenizer

    prompts = build_prompts(corpus.heldout, AutoTokenizer.from_pretrained(info.path), settings.prompts)
    return settings, info, prompts["prompt"].tolist()


def test_batch_files_truth_and_report(policy, tmp_path):
    settings, info, prompts = policy
    sim = settings.simulator
    report = simulate_feedback(info.path, prompts, sim, tmp_path / "landing", batch_id="b1", report_dir=tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "landing").iterdir())
    assert names == sorted(f.rsplit("/", 1)[1] for f in report.files) and all(n.startswith("b1-") for n in names)
    truth = pd.read_parquet(tmp_path / "r" / "truth-b1.parquet")
    assert len(truth) == sum(report.rows.values())
    assert report.samples == sim.prompts_per_batch * sim.samples_per_prompt
    assert json.loads((tmp_path / "r" / "report-b1.json").read_text())["best_accuracy"] == report.best_accuracy
    # the landing files hold what annotators saw, never the ground truth
    for name in names:
        path = tmp_path / "landing" / name
        frame = pd.read_json(path, lines=True) if name.endswith("jsonl") else (
            pd.read_csv(path) if name.endswith("csv") else pd.read_parquet(path))
        assert not {"p_a", "s_a", "s", "malformed", "spammer"} & set(frame.columns)
        assert {"annotator_id", "created_at", "source", "prompt"} <= set(frame.columns)
    # truth scores are the oracle's scores of the written responses, or the broken-text score for
    # responses whose broken bytes were dropped before writing; well-formed rows hold clean text
    clean = truth[truth["malformed"].isna() & (truth["kind"] != "pairwise")]
    rescored = sentiment(clean["response"].tolist())
    assert ((abs(rescored - clean["s"].to_numpy()) < 1e-9) | (clean["s"] == BROKEN_SCORE).to_numpy()).all()
    assert not any(is_broken(t) for t in clean["response"])


def test_same_seed_same_files_other_seed_other_files(policy, tmp_path):
    settings, info, prompts = policy
    a = simulate_feedback(info.path, prompts, settings.simulator, tmp_path / "a", batch_id="x")
    b = simulate_feedback(info.path, prompts, settings.simulator, tmp_path / "b", batch_id="x")
    c = simulate_feedback(info.path, prompts, settings.simulator, tmp_path / "c", batch_id="x", seed=1)
    read = lambda r: [open(f, "rb").read() for f in r.files]  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


def test_data_layer_quarantines_the_corrupted_rows(policy, tmp_path):
    settings, info, prompts = policy
    sim = settings.simulator.model_copy(update={"malformed_share": 0.04})
    report = simulate_feedback(info.path, prompts, sim, tmp_path / "landing", batch_id="b2")
    result = ingest(IngestSettings(landing_dir=str(tmp_path / "landing")), tmp_path / "data")
    assert result.report["rows_in"] == sum(report.rows.values())
    assert result.report["rows_quarantined"] == sum(report.malformed.values()) > 0
    assert 0.03 < result.report["rows_quarantined"] / result.report["rows_in"] < 0.05


def test_a_batch_without_pairwise_rows_is_reported(policy, tmp_path):
    """Every prompt's feedback as ratings and thumbs (or every pairwise sample rejected before the
    annotators): the report has no pairwise labels, no ties and no ceiling, and does not crash."""
    settings, info, prompts = policy
    sim = settings.simulator.model_copy(update={"kind_shares": {"rating": 0.5, "binary": 0.5}, "malformed_share": 0.0})
    report = simulate_feedback(info.path, prompts, sim, tmp_path / "landing", batch_id="np", report_dir=tmp_path / "r")
    assert "pairwise" not in report.rows and report.pairwise_labels == 0 and report.ties == 0
    assert report.best_accuracy != report.best_accuracy  # NaN: no pairwise label to bound
    assert json.loads((tmp_path / "r" / "report-np.json").read_text())["pairwise_labels"] == 0
