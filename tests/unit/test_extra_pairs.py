"""``reward.extra_train_paths`` (issue 15): extra preference pairs for the reward model are checked
before training (errors name the file, row and field), keyed by content, recorded on the reward
run and version, and never reach the judge's held-out pairs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.config import PipelineConfig
from tasks.data.extra_pairs import ExtraPairsError, check_extra_pairs, extra_pairs_tags
from tasks.data.keys import assign_splits, hash64, prompt_keys
from tasks.data.settings import PreferenceSettings
from tasks.records import ModelRecord
from tasks.stages.train import recipe_settings, train_key

PREFS = PreferenceSettings()


def _train_prompts(n: int) -> list[str]:
    """``n`` prompts that the builder's hash puts in the train split."""
    cands = [f"review number {i} of the film" for i in range(4 * n)]
    split = assign_splits(hash64(prompt_keys(cands, np.zeros(len(cands), bool))), PREFS.splits.train,
                          PREFS.splits.validation, PREFS.split_salt)
    return [c for c, s in zip(cands, split, strict=True) if s == 0][:n]


def _held_prompt() -> str:
    cands = [f"held prompt {i}" for i in range(50)]
    split = assign_splits(hash64(prompt_keys(cands, np.zeros(len(cands), bool))), PREFS.splits.train,
                          PREFS.splits.validation, PREFS.split_salt)
    return cands[int(np.flatnonzero(split != 0)[0])]


def _pairs(n: int = 6) -> pd.DataFrame:
    return pd.DataFrame({"prompt": _train_prompts(n), "is_chat": False, "chosen": [" a great film"] * n,
                         "rejected": [" a dull film"] * n, "weight": 1.0})


def test_good_file_gives_rows_and_a_content_digest(tmp_path):
    path = tmp_path / "extra.parquet"
    _pairs().to_parquet(path)
    got = check_extra_pairs([str(path)], PREFS)
    assert got.pairs == 6 and len(got.digest) == 16
    assert check_extra_pairs([], PREFS) is None
    _pairs(5).to_parquet(path)
    assert check_extra_pairs([str(path)], PREFS).digest != got.digest  # content, not path
    folder = tmp_path / "folder"
    folder.mkdir()
    _pairs(4).to_parquet(folder / "a.parquet")
    _pairs(3).to_parquet(folder / "b.parquet")
    assert check_extra_pairs([str(folder)], PREFS).pairs == 7
    tags = extra_pairs_tags({"extra_train": check_extra_pairs([str(folder)], PREFS).to_dict()})
    assert tags["alignflow.reward.extra_pairs"] == "7" and len(tags["alignflow.reward.extra_digest"]) == 16


@pytest.mark.parametrize(("edit", "message"), [
    (lambda f: f.drop(columns="rejected"), r"missing column\(s\) \['rejected'\]"),
    (lambda f: f.assign(chosen=[" ok", None, " ok", " ok", " ok", " ok"]), r"row 1: field 'chosen' must be a non-empty"),
    (lambda f: f.assign(rejected=[" a great film"] + [" bad"] * 5), r"row 0: field 'rejected' must differ"),
    (lambda f: f.assign(weight=[1.0, 1.0, -2.0, 1.0, 1.0, 1.0]), r"row 2: field 'weight' must be a finite number"),
    (lambda f: f.assign(is_chat=[False, False, False, True, False, False]), r"row 3: field 'prompt' must be the JSON"),
    (lambda f: f.assign(prompt=f["prompt"].tolist()[:4] + [_held_prompt()] + f["prompt"].tolist()[5:]),
     r"row 4: field 'prompt' falls in the (validation|test) split \(1 of 6 rows"),
])  # fmt: skip
def test_bad_rows_name_the_file_row_and_field(tmp_path, edit, message):
    path = tmp_path / "bad.parquet"
    edit(_pairs()).to_parquet(path)
    with pytest.raises(ExtraPairsError, match=message) as err:
        check_extra_pairs([str(path)], PREFS)
    assert str(path) in str(err.value) and "reward.extra_train_paths" in str(err.value)


def test_missing_or_unreadable_files_are_named(tmp_path):
    with pytest.raises(ExtraPairsError, match="no such file"):
        check_extra_pairs([str(tmp_path / "nope.parquet")], PREFS)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ExtraPairsError, match=r"junk.parquet: cannot be read as Parquet"):
        check_extra_pairs([str(tmp_path / "junk.parquet")], PREFS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExtraPairsError, match="holds no .parquet"):
        check_extra_pairs([str(tmp_path / "empty")], PREFS)


def test_the_reward_stage_trains_on_the_extra_pairs_evaluates_on_the_rounds_and_keys_them_by_content(tmp_path):
    for name in ("train", "validation", "extra"):
        _pairs().to_parquet(tmp_path / f"{name}.parquet")

    def cfg_with(*extra: str) -> PipelineConfig:
        return PipelineConfig.model_validate({"pipeline": {"home": str(tmp_path / "home")},
                                              "reward": {"extra_train_paths": list(extra)}})

    data = {"pairs-train": str(tmp_path / "train.parquet"), "pairs-validation": str(tmp_path / "validation.parquet")}
    init = ModelRecord(stage="base", path=str(tmp_path / "base"), digest="b" * 16)
    cfg = cfg_with(str(tmp_path / "extra.parquet"))
    _, settings = recipe_settings(cfg, "reward", data, init)
    assert settings.extra_train_paths == [str(tmp_path / "extra.parquet")]
    assert settings.train_path == data["pairs-train"] and settings.eval_path == data["pairs-validation"]
    # the stage's key follows the extra pairs' content, not their path
    with_extra = train_key(cfg, "reward", data, "d" * 16, init)
    assert with_extra != train_key(cfg_with(), "reward", data, "d" * 16, init)
    moved = tmp_path / "moved.parquet"
    (tmp_path / "extra.parquet").rename(moved)
    assert train_key(cfg_with(str(moved)), "reward", data, "d" * 16, init) == with_extra
    _pairs(4).to_parquet(moved)
    assert train_key(cfg_with(str(moved)), "reward", data, "d" * 16, init) != with_extra


def test_version_tags_name_the_extra_and_the_warm_start_pairs():
    assert extra_pairs_tags({}) == {}
    tags = extra_pairs_tags({"extra_train": {"paths": ["x"], "pairs": 7, "digest": "e" * 16},
                             "warm_start": {"paths": ["y"], "pairs": 9, "digest": "f" * 16, "model": "m"}})
    assert tags == {"alignflow.reward.extra_pairs": "7", "alignflow.reward.extra_digest": "e" * 16,
                    "alignflow.reward.warm_start_pairs": "9", "alignflow.reward.warm_start_digest": "f" * 16}
