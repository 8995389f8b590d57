"""A finished recipe run keeps its model and summary, not its resume checkpoints, and is not
launched again (tasks/launcher.py ``finished_summary``; ``keep_checkpoints_after_finish``)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import DPOConfig
from alignment.recipes import get_recipe
from tasks.launcher import finished_summary, run_recipe
from tests.tiny_models import make_tiny_model, preference_pairs


def _config(tmp_path, out: str, **overrides) -> DPOConfig:
    return DPOConfig(model={"name_or_path": str(tmp_path / "m")}, train_path=str(tmp_path / "pairs.parquet"),
                     output_dir=str(tmp_path / out), batch_size=4, max_steps=4, save_every=2, max_length=48,
                     max_prompt_length=16, **overrides)


@pytest.fixture
def tiny(tmp_path):
    make_tiny_model(tmp_path / "m", "gpt2")
    preference_pairs(16).to_parquet(tmp_path / "pairs.parquet")
    return tmp_path


def test_an_interrupted_run_keeps_its_checkpoints_and_a_finished_one_drops_them_with_equal_weights(tiny):
    get_recipe("dpo")(_config(tiny, "straight", keep_checkpoints_after_finish=True)).run()
    kept = tiny / "straight" / "checkpoints"
    assert sorted(p.name for p in kept.iterdir()) == ["step-000002", "step-000004"]  # the library default keeps

    first = get_recipe("dpo")(_config(tiny, "cut", keep_checkpoints_after_finish=False))
    first.run(until_step=2)  # stopped as if killed after its checkpoint: not finished
    assert sorted(p.name for p in (tiny / "cut" / "checkpoints").iterdir()) == ["step-000002"]
    assert not (tiny / "cut" / "final").exists() and finished_summary(tiny / "cut") is None
    again = get_recipe("dpo")(_config(tiny, "cut", keep_checkpoints_after_finish=False))
    summary = again.run()
    assert summary["finished"] and again.resumed_from.endswith("step-000002")
    assert not (tiny / "cut" / "checkpoints").exists()  # finished: the resume state is gone
    assert finished_summary(tiny / "cut")["steps"] == 4
    a = load_file(str(tiny / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tiny / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume == uninterrupted


@pytest.mark.slow
def test_run_recipe_does_not_launch_a_finished_run_again_and_does_launch_other_settings(tiny):
    cfg = _config(tiny, "unused", keep_checkpoints_after_finish=False)
    run_dir = tiny / "run"
    summary = run_recipe("dpo", cfg, run_dir, description="dpo", progress_every_s=None)
    assert summary["finished"] and not (run_dir / "checkpoints").exists()
    launches = (run_dir / "train.log").read_text().count("=== ")
    weights = (run_dir / "final" / "model.safetensors").read_bytes()

    again = run_recipe("dpo", cfg, run_dir, description="dpo", progress_every_s=None)
    assert (run_dir / "train.log").read_text().count("=== ") == launches == 1  # not launched
    assert again == json.loads((run_dir / "summary.json").read_text())
    assert (run_dir / "final" / "model.safetensors").read_bytes() == weights

    other = cfg.model_copy(update={"max_steps": 2})  # other settings in the same folder are another run
    assert finished_summary(run_dir, "dpo", "max_steps: 2\n") is None
    third = run_recipe("dpo", other, run_dir, description="dpo", progress_every_s=None)
    assert third["finished"] and third["steps"] == 2
    assert (run_dir / "train.log").read_text().count("=== ") == 2


def test_a_torn_or_unfinished_summary_is_not_a_finished_run(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "summary.json").write_text('{"finished": tr')  # torn
    assert finished_summary(run) is None
    (run / "summary.json").write_text(json.dumps({"finished": False}))
    assert finished_summary(run) is None
    (run / "summary.json").write_text(json.dumps({"finished": True}))
    assert finished_summary(run) == {"finished": True}
    (run / "final" / "config.json").unlink()  # a model folder half written
    assert finished_summary(run) is None
