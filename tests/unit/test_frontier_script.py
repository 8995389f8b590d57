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
