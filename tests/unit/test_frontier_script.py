"""benchmarks/frontier.py's table and plot from earlier runs' rows (--plot-only --reuse), on the CPU."""

from __future__ import annotations

import json
import sys

import pytest

frontier = pytest.importorskip("benchmarks.frontier")


def row(method, kl, oracle, **extra):
    return {"method": method, "kl": kl, "kl_se": 0.1, "oracle": oracle, "reward": None, "malformed": 0.0,
            "distinct_2": 0.5, **extra}


def test_plot_only_merges_runs_once_each_and_draws_named_series(tmp_path, monkeypatch, capsys):
    first = [row("base", 0.0, 0.22), row("DPO", 10.3, 0.78, beta=0.3),
             row("PPO", 9.9, 0.76, setting="kl.target=10", series="PPO, KL in loss", label="budget 10")]
    second = [row("base", 0.0, 0.99), row("DPO", 10.3, 0.11, beta=0.3), row("DPO", 5.3, 0.63, beta=1.0),
              row("GRPO", 4.8, 0.59, setting="kl.target=5", train_s=348.0)]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    home = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--home", str(home), "--plot-only", "--reuse", str(a), str(b)])
    frontier.main()
    rows = json.loads((home / "frontier.json").read_text())
    # a point already present (same method and setting) is not taken again from a later file
    assert [(r["method"], r.get("beta"), r["oracle"]) for r in rows] == [
        ("base", None, 0.22), ("DPO", 0.3, 0.78), ("PPO", None, 0.76), ("DPO", 1.0, 0.63), ("GRPO", None, 0.59)]
    assert {r["reused_from"] for r in rows} == {str(a), str(b)}
    assert (home / "frontier.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| PPO | PPO, KL in loss: budget 10 | 9.90 ± 0.10 | +0.760 |" in table
    assert "| GRPO | kl.target=5 | 4.80 ± 0.10 | +0.590 | 0.000 | 0.500 | 348 |" in table


def test_short_labels_name_the_kl_setting():
    assert frontier._short_label({"setting": "max_steps=40,kl.target=5"}) == "KL→5"
    assert frontier._short_label({"setting": "kl.coef=0.05"}) == "c=0.05"
    assert frontier._short_label({"setting": "kl.target=5", "label": "budget 5"}) == "budget 5"


def test_a_second_seed_of_one_setting_is_its_own_point(tmp_path, monkeypatch, capsys):
    runs = [row("GRPO", 4.8, 0.59, setting="kl.target=5", seed=0), row("GRPO", 5.6, 0.61, setting="kl.target=5", seed=1)]
    again = [row("GRPO", 9.9, 0.11, setting="kl.target=5", seed=1)]  # the same run from an older file: not taken
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(runs))
    b.write_text(json.dumps(again))
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--home", str(tmp_path / "out"), "--plot-only", "--reuse",
                                      str(a), str(b)])
    frontier.main()
    rows = json.loads((tmp_path / "out" / "frontier.json").read_text())
    assert [(r["seed"], r["oracle"]) for r in rows] == [(0, 0.59), (1, 0.61)]
    table = capsys.readouterr().out
    assert "| GRPO | kl.target=5 | 4.80 ± 0.10 |" in table
    assert "| GRPO | kl.target=5 (seed 1) | 5.60 ± 0.10 |" in table


def test_train_summary_averages_the_second_half_of_the_run(tmp_path):
    from tasks.records import ModelRecord

    run = tmp_path / "ppo-run"
    (run / "final").mkdir(parents=True)
    lines = [{"step": s, "phase": "train", "clipfrac": 0.1 * s, "explained_variance": -1.0 + s} for s in (1, 2, 3, 4)]
    lines.insert(2, {"step": 2, "phase": "eval", "clipfrac": 99.0})  # eval records do not count
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    model = ModelRecord(stage="ppo", path=str(run / "final"), digest="d",
                        summary={"steps": 4, "metrics": {"clipfrac": 0.0, "kl": 5.0, "other": 1.0}})
    out = frontier._train_summary(model)
    assert out["steps"] == 4
    assert out["final"] == {"clipfrac": 0.0, "kl": 5.0}
    assert out["second_half"] == pytest.approx({"clipfrac": 0.35, "explained_variance": 2.5})


def test_frontier_at_interpolates_between_the_measured_dpo_points():
    rows = [row("DPO", 10.0, 0.78, beta=0.3), row("base", 0.0, 0.22), row("DPO", 5.0, 0.62, beta=1.0),
            row("GRPO", 4.0, 0.6, setting="x"), row("KTO", 2.0, 0.9, beta=0.1)]
    curve = frontier.frontier_curve(rows)
    assert curve == [(0.0, 0.22), (5.0, 0.62), (10.0, 0.78)]  # base and DPO only, sorted by KL
    assert frontier.frontier_at(curve, 4.0) == pytest.approx(0.22 + 0.4 * 4 / 5)
    assert frontier.frontier_at(curve, 6.0) == pytest.approx(0.62 + 0.16 / 5)
    assert frontier.frontier_at(curve, 5.0) == pytest.approx(0.62)
    assert frontier.frontier_at(curve, 12.0) is None  # beyond the sweep: no claim
    assert frontier.frontier_curve([row("GRPO", 4.0, 0.6)]) == []
    assert frontier.frontier_at([], 1.0) is None


def test_the_table_gives_each_rl_point_its_gap_to_the_frontier(tmp_path, monkeypatch, capsys):
    rows = [row("base", 0.0, 0.2), row("DPO", 10.0, 0.7, beta=0.3), row("PPO", 5.0, 0.4, setting="s"),
            row("GRPO", 11.0, 0.9, setting="s")]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--home", str(tmp_path / "out"), "--plot-only", "--reuse",
                                      str(tmp_path / "a.json")])
    frontier.main()
    table = capsys.readouterr().out
    # below the lowest DPO point the frontier is the chord from the base: said so beside the gap
    assert "| PPO | s | 5.00 ± 0.10 | +0.400 | 0.000 | 0.500 | - | +0.450 | -0.050 | 0.00–10.00 (chord from the base) |" in table
    assert "| GRPO | s | 11.00 ± 0.10 | +0.900 | 0.000 | 0.500 | - | - | - | - |" in table
    assert "| DPO | β=0.3 | 10.00 ± 0.10 | +0.700 | 0.000 | 0.500 | - | - | - | - |" in table


def test_the_frontier_is_the_upper_hull_of_the_dpo_points():
    # four high-beta points at about one KL, their oracles apart by noise: the low ones drop out
    rows = [row("base", 0.0, 0.22), row("DPO", 3.51, 0.51, beta=6.0), row("DPO", 3.75, 0.554, beta=8.0),
            row("DPO", 3.77, 0.525, beta=4.0), row("DPO", 4.04, 0.577, beta=2.0), row("DPO", 5.4, 0.62, beta=1.0)]
    curve = frontier.frontier_curve(rows)
    assert curve == [(0.0, 0.22), (3.75, 0.554), (4.04, 0.577), (5.4, 0.62)]
    # a point under the chord of its neighbours is gone; the gap there is to the chord
    assert frontier.frontier_at(curve, 3.77) == pytest.approx(0.554 + 0.023 * 0.02 / 0.29)
    assert frontier.upper_hull([(0.0, 0.0), (1.0, 1.0), (1.0, 0.5), (2.0, 2.0)]) == [(0.0, 0.0), (2.0, 2.0)]
    assert frontier.upper_hull([(0.0, 0.0), (1.0, 1.5), (2.0, 2.0)]) == [(0.0, 0.0), (1.0, 1.5), (2.0, 2.0)]


def test_the_plot_draws_the_hull_as_the_dpo_line(tmp_path, monkeypatch, capsys):
    drawn = {}
    monkeypatch.setattr(frontier, "plot_reward_vs_kl", lambda series, path, **kw: drawn.update(series) or path)
    rows = [row("base", 0.0, 0.22), row("DPO", 3.51, 0.51, beta=6.0), row("DPO", 3.75, 0.554, beta=8.0),
            row("DPO", 5.4, 0.62, beta=1.0)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--home", str(tmp_path / "out"), "--plot-only", "--reuse",
                                      str(tmp_path / "a.json")])
    frontier.main()
    assert [kl for _, kl, _ in drawn["DPO (β sweep)"]] == [5.4, 3.75, 0.0]
    assert drawn["DPO β=6.0, under the hull"] == [("β=6.0", 3.51, 0.51)]


def test_bracket_names_the_measured_points_around_a_kl():
    curve = [(0.0, 0.22), (2.0, 0.4), (5.0, 0.62), (10.0, 0.78)]
    assert frontier.bracket(curve, 1.5) == "0.00–2.00 (chord from the base)"
    assert frontier.bracket(curve, 3.0) == "2.00–5.00"
    assert frontier.bracket(curve, 10.0) == "5.00–10.00"
    assert frontier.bracket(curve, 12.0) == "outside"


def test_rows_marked_plot_false_stay_in_the_table_but_out_of_the_plot(tmp_path, monkeypatch, capsys):
    drawn = {}
    monkeypatch.setattr(frontier, "plot_reward_vs_kl", lambda series, path, **kw: drawn.update(series) or path)
    rows = [row("base", 0.0, 0.2), row("DPO", 5.0, 0.6, beta=1.0), row("DPO", 10.0, 0.7, beta=0.3),
            row("DPO", 2.0, 0.4, beta=3.0), row("PPO", 9.0, 0.5, setting="old", series="PPO, old", plot=False),
            row("PPO", 4.0, 0.5, setting="new", series="PPO, new")]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    monkeypatch.setattr(sys, "argv", ["frontier.py", "--home", str(tmp_path / "out"), "--plot-only", "--reuse",
                                      str(tmp_path / "a.json")])
    frontier.main()
    assert set(drawn) == {"DPO (β sweep)", "PPO, new"}
    assert [kl for _, kl, _ in drawn["DPO (β sweep)"]] == [10.0, 5.0, 2.0, 0.0]  # one line, ending at the base
    assert "| PPO | PPO, old | 9.00 ± 0.10 |" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out" / "frontier.json").read_text())) == len(rows)
