"""The evaluation sample cache's layout (tasks.evaluation.sample_cache): round trip, keys, bad entries."""

from __future__ import annotations

import os
import shutil

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.generation import GenerationResult
from tasks.evaluation import sample_cache


def _gen() -> GenerationResult:
    return GenerationResult(torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]),
                            torch.tensor([[3, 2, 0], [4, 4, 2]]), torch.tensor([[1, 1, 0], [1, 1, 1]]),
                            torch.tensor([True, True]), ["a b", "c c é"], 0)


def _key(tmp_path, **kw):
    for name in ("model", "ref"):
        if not (tmp_path / name).is_dir():
            (tmp_path / name).mkdir()
            (tmp_path / name / "config.json").write_text("{}")
    args = dict(prompts=["p", "q"], greedy_prompts=None, settings={"seed": 1}, device="cpu") | kw
    return sample_cache.sample_key(tmp_path / "model", tmp_path / "ref", **args)


def test_a_bundle_reads_back_as_written(tmp_path):
    key = _key(tmp_path)
    lp = np.array([-1.5, -2.25])
    sample_cache.save(tmp_path / "c", key, _gen(), lp, lp, None, ["g1", "g2"])  # logps and ref_logps one array
    got = sample_cache.load(tmp_path / "c", key)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "hit_eos"):
        assert torch.equal(getattr(got["gen"], name), getattr(_gen(), name))
    assert got["gen"].texts == ["a b", "c c é"] and got["gen"].pad_token_id == 0
    np.testing.assert_array_equal(got["logps"], lp)
    np.testing.assert_array_equal(got["ref_logps"], lp)
    assert got["fluency_logps"] is None and got["greedy"] == ["g1", "g2"]
    assert not list((tmp_path / "c").glob(".*"))  # no temporary files left


def test_keys_follow_what_shapes_the_samples(tmp_path):
    key = _key(tmp_path)
    assert key == _key(tmp_path)
    assert key != _key(tmp_path, prompts=["p"]) and key != _key(tmp_path, settings={"seed": 2})
    assert key != _key(tmp_path, greedy_prompts=["p"]) and key != _key(tmp_path, device="cuda")
    (tmp_path / "model" / "config.json").write_text("{} ")  # the same folder, another model
    changed = _key(tmp_path)
    assert changed != key
    (tmp_path / "ref" / "config.json").write_text("[]")  # a rewritten reference of the same size
    rewritten = _key(tmp_path)
    assert rewritten not in (key, changed)
    os.utime(tmp_path / "ref" / "config.json", ns=(1, 1))  # touched, not changed: the same model
    assert _key(tmp_path) == rewritten
    # the same files in another folder (the registry's copy of a candidate, back as the next round's champion)
    shutil.copytree(tmp_path / "model", tmp_path / "registry" / "model")
    assert sample_cache.sample_key(tmp_path / "registry" / "model", tmp_path / "ref", prompts=["p", "q"],
                                   greedy_prompts=None, settings={"seed": 1}, device="cpu") == rewritten
    assert sample_cache.sample_key("org/model-on-the-hub", tmp_path / "ref", prompts=[], greedy_prompts=None,
                                   settings={}, device="cpu") is None


def test_incomplete_entries_are_misses(tmp_path):
    key = _key(tmp_path)
    sample_cache.save(tmp_path, key, _gen(), np.zeros(2), np.zeros(2), np.zeros(2), None)
    (tmp_path / f"{key}.json").unlink()
    assert sample_cache.load(tmp_path, key) is None
    assert sample_cache.load(tmp_path, "absent") is None


@settings(max_examples=60, deadline=None)
@given(tensors=st.binary(max_size=300), meta=st.binary(max_size=200))
def test_garbage_entries_are_misses_not_crashes(tmp_path_factory, tensors, meta):
    folder = tmp_path_factory.mktemp("garbage")
    (folder / "k.safetensors").write_bytes(tensors)
    (folder / "k.json").write_bytes(meta)
    assert sample_cache.load(folder, "k") is None
