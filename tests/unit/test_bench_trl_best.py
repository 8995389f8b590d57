"""The GPU comparison's data and accounting (benchmarks/gpu_trl_best.py), checked on the CPU."""

from __future__ import annotations

import importlib

import pytest

trl_best = pytest.importorskip("benchmarks.gpu_trl_best")


def test_real_pairs_follow_the_published_means_when_nothing_is_clipped():
    law = trl_best.DISTS["hh"]
    rows, stats = trl_best.real_pairs(4000, 100_000, 1000, law, seed=1)
    assert stats["clipped_share"] == 0
    assert stats["prompt"]["mean"] == pytest.approx(law["prompt_mean"], rel=0.05)
    assert stats["response"]["mean"] == pytest.approx(law["response_mean"], rel=0.05)
    # one word-level token per word: the text carries the drawn lengths
    assert sum(len(r["prompt"].split()) for r in rows) / len(rows) == pytest.approx(stats["prompt"]["mean"])


def test_real_pairs_fit_the_sequence_length():
    seq = 256
    rows, stats = trl_best.real_pairs(500, seq, 1000, trl_best.DISTS["hh"], seed=2)
    assert 0 < stats["clipped_share"] < 1
    for r in rows:
        p = len(r["prompt"].split())
        assert p <= seq // 2
        assert max(len(r["chosen"].split()), len(r["rejected"].split())) <= seq - p - 1


def test_epoch_rate_counts_the_reference_pass_once_per_token():
    # 100 tokens/s training and 300 tokens/s reference: 1/100 + 1/300 s per token
    assert trl_best.epoch_rate({"tokens_per_s": 100.0, "ref_tokens_per_s": 300.0}) == pytest.approx(75.0)
    assert trl_best.epoch_rate({"tokens_per_s": 100.0}) == 100.0


def test_reference_rate_leaves_the_first_batches_out():
    out = trl_best.reference_rate([10, 100, 100], [5.0, 1.0, 1.0], skip=1)
    assert out["ref_tokens_per_s"] == pytest.approx(100.0)
    assert out["ref_first_batches_s"] == 5.0 and out["ref_tokens"] == 210


def test_liger_globals_are_put_back():
    module = importlib.import_module(trl_best.LIGER_MODULES[0])
    original = module.apply_rotary_pos_emb
    with trl_best.LigerGlobals():
        module.apply_rotary_pos_emb = lambda *a: a
    assert module.apply_rotary_pos_emb is original


def _fake_runs(monkeypatch, first_error):
    """run_trl raising ``first_error`` on its first call; the calls' liger flags are recorded."""
    calls = []

    def run_trl(family, folder, rows, args, *, pairs, seq, liger=True):
        calls.append(liger)
        if len(calls) == 1:
            raise first_error
        return {"tokens_per_s": 1.0}

    monkeypatch.setattr(trl_best, "run_trl", run_trl)
    monkeypatch.setattr(trl_best, "reset_accelerate", lambda: None)
    return calls


def test_trl_out_of_memory_is_raised_not_retried_without_liger(monkeypatch):
    import torch

    calls = _fake_runs(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    args = type("Args", (), {"device_t": torch.device("cpu")})()
    with pytest.raises(torch.OutOfMemoryError):
        trl_best.trl_best("dpo_lora", None, [], args, pairs=1, seq=8)
    assert calls == [True]


def test_a_liger_failure_is_retried_without_liger_and_recorded(monkeypatch):
    import torch

    calls = _fake_runs(monkeypatch, ValueError("liger cannot patch this model"))
    args = type("Args", (), {"device_t": torch.device("cpu")})()
    out = trl_best.trl_best("dpo", None, [], args, pairs=1, seq=8)
    assert calls == [True, False]
    assert out["liger_error"] == "ValueError: liger cannot patch this model"


def test_long_pair_has_the_probed_length():
    row = trl_best.long_pair(1000, 500)
    prompt, response = len(row["prompt"].split()), len(row["chosen"].split())
    assert prompt == 250 and response == 749 and len(row["rejected"].split()) == 749
    assert prompt + response + 1 == 1000


@pytest.mark.slow
def test_length_probe_trains_one_pair_of_the_probed_length_with_our_recipe(tmp_path):
    import argparse

    import torch

    from benchmarks.gpu_bench import SHAPES, build_shape

    args = argparse.Namespace(device_t=torch.device("cpu"), precision="fp32", warmup=3, steps=20, work=tmp_path,
                              base_dtype="float32")
    folder = build_shape(tmp_path, "tiny", args.device_t)
    out = trl_best.length_probe("dpo_lora", "ours", folder, SHAPES["tiny"]["vocab_size"], 64, args)
    assert out["fits"] is True
    assert out["tokens_per_s"] * out["step_s"] == pytest.approx(2 * 64)  # both sequences of the pair, whole
    assert (args.warmup, args.steps) == (3, 20)  # the probe's own 1 + 1 steps do not leak into the caller's


def test_length_probe_reports_out_of_memory_as_not_fitting(monkeypatch, tmp_path):
    import argparse

    import torch

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 448.00 MiB.")

    monkeypatch.setattr(trl_best, "run_ours", oom)
    args = argparse.Namespace(work=tmp_path, warmup=3, steps=20)
    out = trl_best.length_probe("dpo_lora", "ours", tmp_path, 1000, 8192, args)
    assert out == {"fits": False, "error": "CUDA out of memory. Tried to allocate 448.00 MiB."}


def test_length_probe_records_a_failure_that_is_not_out_of_memory_as_unknown(monkeypatch, tmp_path):
    import argparse

    seen = {}

    def broken(family, folder, data, args, *, pairs, seq):
        seen["gc"] = args.gc
        raise RuntimeError("compiled backward failed")

    monkeypatch.setattr(trl_best, "run_ours", broken)
    args = argparse.Namespace(work=tmp_path, warmup=3, steps=20, probe_gc=True)
    out = trl_best.length_probe("dpo_lora", "ours", tmp_path, 1000, 256, args)
    assert out == {"fits": None, "error": "RuntimeError: compiled backward failed"}
    assert seen["gc"] is True  # --probe-gc reaches the run; the caller's args are left alone
    assert not hasattr(args, "gc")


def test_flops_per_token_leaves_the_frozen_base_weight_gradients_out_under_lora():
    assert trl_best.flops_per_token("dpo", 10) == 60
    assert trl_best.flops_per_token("rm", 10) == 60
    assert trl_best.flops_per_token("dpo_lora", 10) == 40
    assert trl_best.flops_per_token("dpo_qlora", 10) == 40


def test_plan_warms_trl_once_then_alternates_and_plans_nothing_for_zero_repeats():
    import argparse

    args = argparse.Namespace(shapes="llama8b", dists="hh", families="dpo_lora,rm", repeats=2, other_repeats=1,
                              trl_default=False)
    sides = [(family, side, rep) for _, _, family, side, rep in trl_best.plan(args)]
    assert sides[:2] == [("dpo_lora", "trl", "cold"), ("rm", "trl", "cold")]
    assert sides[2:6] == [("dpo_lora", "ours", 0), ("dpo_lora", "trl", 0), ("rm", "ours", 0), ("rm", "trl", 0)]
    assert len(sides) == 10
    args.repeats = 0
    assert trl_best.plan(args) == []


def test_peak_composition_sums_what_is_live_at_the_peak_by_call_site():
    gib = 2**30

    def at(file, line):
        return [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
                {"filename": f"/site/{file}", "line": line, "name": "forward"}]

    events = [
        {"action": "alloc", "addr": 1, "size": 4 * gib, "frames": at("models/llama.py", 10)},   # weights
        {"action": "alloc", "addr": 2, "size": 1 * gib, "frames": at("models/llama.py", 20)},   # activation
        {"action": "alloc", "addr": 3, "size": 1 * gib, "frames": at("models/llama.py", 20)},   # activation
        {"action": "alloc", "addr": 4, "size": 2 * gib, "frames": at("peft/lora.py", 5)},       # peak: 8 GiB
        {"action": "free_requested", "addr": 4, "size": 2 * gib, "frames": []},
        {"action": "free_completed", "addr": 4, "size": 2 * gib, "frames": []},
        {"action": "free_completed", "addr": 2, "size": 1 * gib, "frames": []},
        {"action": "alloc", "addr": 5, "size": 3 * gib, "frames": []},                          # 7 GiB: below
    ]
    out = trl_best.peak_composition(events)
    assert out["peak_gib"] == 8
    assert out["sites"] == [["models/llama.py:10 forward", 4], ["models/llama.py:20 forward", 2],
                            ["peft/lora.py:5 forward", 2]]
    assert trl_best.peak_composition(events[:1] + [{"action": "alloc", "addr": 9, "size": gib, "frames": [
        {"filename": "/x/torch/autograd/graph.py", "line": 3, "name": "backward"}]}])["sites"][1] == ["torch internals", 1]
