"""A floor of kept samples per feedback batch (``min_kept_samples``): when the filters reject most
samples, the simulator draws more prompts until the annotators have enough, and the cap stops it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from tasks.demo import simulator
from tasks.demo.settings import SimulatorSettings
from tasks.demo.simulator import draw_seed, next_draw_size, paired_count, simulate_feedback, usable_count

WORDS = ["a fine film", "a dull plot", "a warm and funny story", "the actors are charming", "a clumsy thriller"]


def fake_sampler(keep_share: float, calls: list):
    """Distinct texts per (seed, prompt, sample); each sample ends with EOS with probability
    ``keep_share`` under the draw's seed, so ``reject_truncated`` keeps about that share."""

    def sample(policy_path, drawn, settings, seed):
        calls.append((list(drawn), seed))
        rng = np.random.default_rng(seed)
        k = settings.samples_per_prompt
        texts = [[f"{WORDS[(n + j) % len(WORDS)]} {p} s{seed % 1000}-{n}-{j}" for j in range(k)] for n, p in enumerate(drawn)]
        return texts, (rng.random((len(drawn), k)) < keep_share).tolist()

    return sample


def seen(report_dir, batch) -> list[tuple[str, str]]:
    truth = pd.read_parquet(report_dir / f"truth-{batch}.parquet")
    pairs = truth[truth["kind"] == "pairwise"]
    shown = [(p, t) for p, t in zip(truth["prompt"], truth["response"], strict=True) if isinstance(t, str)]
    for col in ("response_a", "response_b"):
        shown += list(zip(pairs["prompt"], pairs[col], strict=True))
    return shown


PROMPTS = [f"prompt number {i}" for i in range(50)]
BASE = SimulatorSettings(prompts_per_batch=20, samples_per_prompt=4, malformed_share=0.0, reject_truncated=True)


def test_without_a_floor_one_draw_as_before(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(simulator, "sample_responses", fake_sampler(0.2, calls))
    report = simulate_feedback("unused", PROMPTS, BASE, tmp_path / "land", batch_id="b", seed=3)
    assert [(len(d), s) for d, s in calls] == [(20, 3)] and report.draws == 1 and report.prompts == 20 and report.samples == 80
    assert report.kept_samples + report.rejected_samples == 80


def test_the_batch_reaches_the_floor_when_most_samples_are_rejected(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(simulator, "sample_responses", fake_sampler(0.2, calls))
    settings = BASE.model_copy(update={"min_kept_samples": 60, "max_prompts_per_batch": 400})
    report = simulate_feedback("unused", PROMPTS, settings, tmp_path / "land", batch_id="b",
                               report_dir=tmp_path / "r", seed=3)
    # one draw of 20 prompts keeps about 16 samples; the floor takes more draws, each with its own seed
    assert report.draws == len(calls) > 1 and (len(calls[0][0]), calls[0][1]) == (20, 3)
    assert len({s for _, s in calls}) == len(calls)
    drawn = [p for d, _ in calls for p in d]
    assert report.kept_samples >= 60 and report.prompts == len(drawn) <= 400
    assert report.samples == 4 * report.prompts == report.kept_samples + report.rejected_samples
    # the pool (50 prompts) is used up before a prompt is drawn again
    assert len(drawn) > 50 and len(set(drawn[:50])) == 50
    # the annotators see samples of the later draws too, and only kept ones
    shown = {t for _, t in seen(tmp_path / "r", "b")}
    tags = {t.rsplit(" s", 1)[1].split("-")[0] for t in shown}
    assert len(tags) > 1 and len(shown) <= report.kept_samples


def test_the_cap_stops_a_batch_that_keeps_almost_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(simulator, "sample_responses", fake_sampler(0.0, calls))
    settings = BASE.model_copy(update={"min_kept_samples": 60, "max_prompts_per_batch": 70})
    # nothing kept at all: the batch draws up to the cap once, then fails as an empty batch would
    with pytest.raises(ValueError, match="no usable response"):
        simulate_feedback("unused", PROMPTS, settings, tmp_path / "land", batch_id="b", seed=3)
    assert [len(d) for d, _ in calls] == [20, 50]
    # a few kept: the cap, not the floor, ends the batch
    calls.clear()
    monkeypatch.setattr(simulator, "sample_responses", fake_sampler(0.05, calls))
    report = simulate_feedback("unused", PROMPTS, settings, tmp_path / "land2", batch_id="b", seed=3)
    assert report.prompts == 70 and report.kept_samples < 60 and report.draws == len(calls) >= 2


def test_same_seed_same_batch_other_seed_other_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(simulator, "sample_responses", fake_sampler(0.2, []))
    settings = BASE.model_copy(update={"min_kept_samples": 60, "novelty_weight": 10.0})
    run = lambda name, seed: simulate_feedback("unused", PROMPTS, settings, tmp_path / name,  # noqa: E731
                                               batch_id="x", seed=seed)
    a, b, c = run("a", 5), run("b", 5), run("c", 6)
    read = lambda r: [open(f, "rb").read() for f in r.files]  # noqa: E731
    assert read(a) == read(b) and (a.draws, a.kept_samples) == (b.draws, b.kept_samples)
    assert read(a) != read(c)


def test_a_paired_floor_counts_only_samples_a_pair_can_come_from(tmp_path, monkeypatch):
    ends = []  # per draw: the sampler's EOS flags (kept = ended: the texts are distinct)

    def recording(*args):
        texts, ended = fake_sampler(0.3, [])(*args)
        ends.append(ended)
        return texts, ended

    monkeypatch.setattr(simulator, "sample_responses", recording)
    floor = BASE.model_copy(update={"min_kept_samples": 20, "max_prompts_per_batch": 400})
    by_samples = simulate_feedback("unused", PROMPTS, floor, tmp_path / "s", batch_id="b", seed=3)
    first = ends[0]
    # 30% kept: one draw of 20 prompts keeps 20+ samples, but many prompts keep only one
    assert by_samples.draws == 1 and by_samples.kept_samples >= 20 > by_samples.paired_samples
    ends.clear()
    paired = floor.model_copy(update={"floor_counts": "paired"})
    report = simulate_feedback("unused", PROMPTS, paired, tmp_path / "p", batch_id="b", seed=3)
    # the first draw is the same batch; more draws until 20 samples sit on prompts keeping two or more
    assert ends[0] == first and report.draws == len(ends) > 1
    kept = [sum(row) for draw in ends for row in draw]
    assert report.kept_samples == sum(kept) and report.paired_samples == sum(k for k in kept if k >= 2) >= 20


def test_paired_count():
    assert paired_count(["a", "b", ""]) == 2 and paired_count(["a", "", "a"]) == 0 and paired_count(["a", "b", "c"]) == 3


def test_the_floor_counts_samples_unless_told_otherwise():
    assert SimulatorSettings().floor_counts == "samples"
    with pytest.raises(ValidationError):
        SimulatorSettings(floor_counts="pairs")


def test_next_draw_size():
    assert next_draw_size(floor=100, kept=20, drawn=20, cap=1000) == 88  # 80 short at 1 a prompt, 10% over
    assert next_draw_size(floor=100, kept=20, drawn=20, cap=50) == 30  # what the cap leaves
    assert next_draw_size(floor=100, kept=100, drawn=20, cap=1000) == 0
    assert next_draw_size(floor=100, kept=0, drawn=20, cap=60) == 40
    assert next_draw_size(floor=100, kept=5, drawn=60, cap=60) == 0


def test_draw_seeds_and_usable_count():
    assert draw_seed(7, 0) == 7 and len({draw_seed(7, d) for d in range(1, 20)} | {7}) == 20
    assert draw_seed(7, 1) == draw_seed(7, 1) != draw_seed(8, 1)
    assert usable_count(["a", "", "  ", "a", "b"]) == 2


def test_the_cap_may_not_be_below_one_draw():
    with pytest.raises(ValidationError, match="max_prompts_per_batch"):
        SimulatorSettings(prompts_per_batch=400, min_kept_samples=100, max_prompts_per_batch=300)


def test_the_loop_table_shows_kept_samples_and_draws():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("loop_table", Path(__file__).parents[2] / "benchmarks" / "loop_table.py")
    loop_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop_table)
    rounds = [{"round": 0, "feedback from": "base", "rejected samples": 856, "kept samples": 2321, "draws": 1,
               "paired samples": 2200, "pairs built": 1101, "promoted": True, "champion": 1, "oracle": 0.62, "kl": 5.4},
              {"round": 1, "feedback from": "v1", "rejected samples": 5270, "kept samples": 1258, "draws": 2,
               "promoted": False, "why not": "KL", "champion": 1, "oracle": 0.62, "kl": 5.4}]
    rows = loop_table.markdown({"base_oracle": 0.22, "rounds": rounds}).splitlines()
    assert "kept samples (draws)" in rows[0]
    assert "| 856 | 2321 (1) | 2200 | 1101 |" in rows[2] and "| 5270 | 1258 (2) | - | - |" in rows[3]
    assert all(r.count("|") == rows[0].count("|") for r in rows[:4])
    greedy = {**rounds[1], "greedy looping": 0.534, "base greedy looping": 0.466, "greedy rise SE": 0.031,
              "greedy prompts": 220, "answers ending": 0.4}
    row = loop_table.markdown({"rounds": [greedy]}).splitlines()[2]
    assert "| 53.4% (+6.8 ± 3.1), 220 | 0.40 |" in row and row.count("|") == rows[0].count("|")
