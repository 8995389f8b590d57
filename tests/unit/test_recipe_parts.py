"""The parts a recipe composes, on their own: checkpoints, the metrics sink, the batch feed, the guarded update."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from alignment.batching import ExampleSet, LengthGroupedSampler
from alignment.config import TrainSettings
from alignment.logprobs import NonFiniteError
from alignment.recipes.checkpoint import Checkpointer, ResumeConfigError
from alignment.recipes.feed import BatchFeed
from alignment.recipes.metrics_log import MetricsLog
from alignment.recipes.optim import build_optimizer, build_scheduler, guarded_step, skips_on_device


@pytest.fixture
def accelerator():
    # accelerate keeps one process-wide state; start from a clean one and leave none behind
    # (another test may want a different mixed precision).
    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def _parts(config: TrainSettings, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    optimizer = build_optimizer(model, config.optim, torch.device("cpu"), "test")
    return model, optimizer, build_scheduler(optimizer, config.optim, 10)


def _train_once(model, optimizer, scheduler):
    model(torch.randn(3, 4)).pow(2).mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_checkpoints_keep_the_newest_complete_ones_and_restore_everything(tmp_path, accelerator):
    config = TrainSettings(output_dir=str(tmp_path), keep_checkpoints=2, optim={"lr": 0.1, "warmup_steps": 2})
    model, optimizer, scheduler = _parts(config)
    ckpt = Checkpointer(tmp_path, accelerator, config)
    assert ckpt.latest() is None
    for step in (1, 2, 3):
        _train_once(model, optimizer, scheduler)
        ckpt.save(step, {"model.safetensors": model}, optimizer, scheduler, {"kl": {"value": step}},
                  {"step": step, "sampler": {"epoch": 0, "position": step}})
    assert sorted(p.name for p in ckpt.folder.iterdir()) == ["step-000002", "step-000003"]
    state = json.loads((ckpt.path(3) / "state.json").read_text())
    assert state == {"step": 3, "sampler": {"epoch": 0, "position": 3}, "num_processes": 1}
    torn = ckpt.folder / "step-000004.tmp"  # a crash between writing and the rename
    torn.mkdir()
    (torn / "state.json").write_text("{}")
    assert ckpt.latest() == ckpt.path(3)

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    lr = scheduler.get_last_lr()
    draw = torch.rand(3)  # the RNG stream right after the checkpoint
    fresh, fresh_opt, fresh_sched = _parts(config, seed=1)
    state, extra = ckpt.load(ckpt.latest(), {"model.safetensors": fresh}, fresh_opt, fresh_sched, torch.device("cpu"))
    assert state["step"] == 3 and extra == {"kl": {"value": 3}}
    assert all(torch.equal(saved[k], v) for k, v in fresh.state_dict().items())
    assert fresh_sched.get_last_lr() == lr and fresh_sched.state_dict() == scheduler.state_dict()
    _assert_same_optimizer_state(fresh_opt.state_dict(), optimizer.state_dict())
    assert torch.equal(torch.rand(3), draw)


def _assert_same_optimizer_state(got: dict, want: dict) -> None:
    assert got["param_groups"] == want["param_groups"]  # betas stay a tuple, lr etc. exact
    assert got["state"].keys() == want["state"].keys()
    for pid, entry in want["state"].items():
        assert got["state"][pid].keys() == entry.keys()
        for name, value in entry.items():
            restored = got["state"][pid][name]
            assert type(restored) is type(value), name
            if isinstance(value, torch.Tensor):
                assert restored.dtype == value.dtype and restored.device == value.device, name
                assert torch.equal(restored, value), name
            else:
                assert restored == value, name


def _is_pickle(path) -> bool:
    """A raw pickle starts with the PROTO opcode; torch.save's zip holds a data.pkl."""
    import zipfile

    if path.read_bytes()[:1] == b"\x80":
        return True
    return zipfile.is_zipfile(path) and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist())


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_checkpoint_is_json_and_safetensors_only_and_round_trips_exactly(tmp_path, accelerator, fused):
    import random

    import numpy as np

    config = TrainSettings(output_dir=str(tmp_path), optim={"lr": 0.1, "warmup_steps": 2, "fused": fused})
    model, optimizer, scheduler = _parts(config)
    assert bool(optimizer.defaults.get("fused")) == fused
    for _ in range(3):
        _train_once(model, optimizer, scheduler)
    # recipe state may hold tensors, tuples, non-string keys and non-finite floats
    extra = {"kl": {"value": 0.1 + 0.2}, "odd": {3: (float("nan"), float("-inf"), None, True, "s")},
             "t": {"mean": torch.arange(3, dtype=torch.bfloat16)}}
    random.seed(5), np.random.seed(5)
    path = Checkpointer(tmp_path, accelerator, config).save(3, {"model.safetensors": model}, optimizer, scheduler,
                                                           extra, {"step": 3})
    draws = (random.random(), np.random.rand(), torch.rand(2))
    assert {p.name for p in path.iterdir()} == {
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json", "extra.json",
        "extra.safetensors", "rng.json", "rng.safetensors", "state.json", "config.json"}
    assert not [p.name for p in path.iterdir() if _is_pickle(p)]
    assert all(json.loads((path / n).read_text()) is not None for n in ("optimizer.json", "rng.json"))

    fresh, fresh_opt, fresh_sched = _parts(config, seed=1)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _, got_extra = Checkpointer(tmp_path, accelerator, config).load(
        path, {"model.safetensors": fresh}, fresh_opt, fresh_sched, torch.device("cpu"))
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(2), draws[2])
    _assert_same_optimizer_state(fresh_opt.state_dict(), optimizer.state_dict())
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert got_extra["kl"] == {"value": 0.1 + 0.2} and list(got_extra["odd"]) == [3]
    nan, ninf, *rest = got_extra["odd"][3]
    assert nan != nan and ninf == float("-inf") and rest == [None, True, "s"]
    assert torch.equal(got_extra["t"]["mean"], extra["t"]["mean"]) and got_extra["t"]["mean"].dtype == torch.bfloat16
    for _ in range(2):  # the restored copy goes on exactly like the original
        for parts in ((model, optimizer, scheduler), (fresh, fresh_opt, fresh_sched)):
            torch.manual_seed(1)
            _train_once(*parts)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True))


def test_checkpoint_refuses_objects_it_would_have_to_pickle(tmp_path, accelerator):
    config = TrainSettings(output_dir=str(tmp_path))
    model, optimizer, scheduler = _parts(config)
    with pytest.raises(TypeError, match=r"extra\.json: state ctl is a object"):
        Checkpointer(tmp_path, accelerator, config).save(1, {"m.safetensors": model}, optimizer, scheduler,
                                                         {"ctl": object()}, {"step": 1})


def test_an_old_checkpoint_with_torch_pickles_is_refused_naming_the_folder(tmp_path, accelerator):
    config = TrainSettings(output_dir=str(tmp_path))
    model, optimizer, scheduler = _parts(config)
    ckpt = Checkpointer(tmp_path, accelerator, config)
    path = ckpt.save(1, {"m.safetensors": model}, optimizer, scheduler, {}, {"step": 1})
    planted = path / "optimizer.pt"
    torch.save({"state": {}, "param_groups": []}, planted)  # what older versions wrote
    assert _is_pickle(planted)
    with pytest.raises(ResumeConfigError, match=rf"cannot resume from {path}: it holds optimizer\.pt, torch pickles"):
        ckpt.load(ckpt.latest(), {"m.safetensors": model}, optimizer, scheduler, torch.device("cpu"))


def test_a_damaged_checkpoint_state_pair_is_named(tmp_path, accelerator):
    config = TrainSettings(output_dir=str(tmp_path))
    model, optimizer, scheduler = _parts(config)
    _train_once(model, optimizer, scheduler)
    ckpt = Checkpointer(tmp_path, accelerator, config)
    path = ckpt.save(1, {"m.safetensors": model}, optimizer, scheduler, {}, {"step": 1})
    (path / "scheduler.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"scheduler\.json: not valid JSON"):
        ckpt.load(path, {"m.safetensors": model}, optimizer, scheduler, torch.device("cpu"))
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(ValueError, match=r"optimizer\.json: tensor 'state\.0\.(step|exp_avg)' is missing"):
        ckpt.load(path, {"m.safetensors": model}, optimizer, scheduler, torch.device("cpu"))


def test_resume_refuses_a_changed_config_listing_each_difference(tmp_path, accelerator):
    config = TrainSettings(output_dir=str(tmp_path), max_steps=5, optim={"lr": 0.1})
    model, optimizer, scheduler = _parts(config)
    Checkpointer(tmp_path, accelerator, config).save(1, {"m.safetensors": model}, optimizer, scheduler, {}, {"step": 1})
    path = tmp_path / "checkpoints" / "step-000001"
    # fields that do not change the math may differ
    same_math = config.model_copy(update={"log_every": 5, "keep_checkpoints": 4, "output_dir": str(tmp_path / "x")})
    Checkpointer(tmp_path, accelerator, same_math).check_config(path)
    changed = config.model_copy(update={"max_steps": 7, "optim": config.optim.model_copy(update={"lr": 0.2})})
    with pytest.raises(ResumeConfigError) as err:
        Checkpointer(tmp_path, accelerator, changed).check_config(path)
    assert "max_steps: 5 -> 7" in str(err.value) and "optim.lr: 0.1 -> 0.2" in str(err.value)
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "num_processes": 2}))
    with pytest.raises(ResumeConfigError, match="written by 2 processes, now 1"):
        Checkpointer(tmp_path, accelerator, config).load(path, {"m.safetensors": model}, optimizer, scheduler,
                                                         torch.device("cpu"))


def test_metrics_log_keeps_records_up_to_the_resumed_step_and_calls_back(tmp_path):
    seen = []
    sink = MetricsLog([seen.append])
    sink.open(tmp_path, resumed_step=0)
    for step in (1, 2, 3):
        sink.emit(step, 3, "train", {"loss": float(step)})
    sink.close()
    assert [r["step"] for r in seen] == [1, 2, 3] and set(seen[0]) == {"step", "total_steps", "phase", "time", "loss"}
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "pha')  # torn by a crash
    again = MetricsLog()
    again.open(tmp_path, resumed_step=2)
    again.emit(3, 3, "eval", {"eval/loss": 0.5})
    again.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in lines] == [(1, "train"), (2, "train"), (3, "eval")]
    fresh = MetricsLog()
    fresh.open(tmp_path, resumed_step=0)  # a run that starts over drops the old records
    fresh.close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_feed_checkpoints_the_position_before_a_prefetched_batch():
    data = ExampleSet([{"index": i, "num_tokens": 1 + i % 3} for i in range(12)],
                      lambda exs: {"index": [e["index"] for e in exs]}, {})
    feed = BatchFeed(data, LengthGroupedSampler(data.lengths, 2, seed=0))
    feed.collate_next()
    before = feed.position()
    feed.prefetch()
    assert feed.position() == before  # the prefetched batch is not used yet
    upcoming = feed.collate_next()
    resumed = BatchFeed(data, LengthGroupedSampler(data.lengths, 2, seed=0))
    resumed.load_position(before)
    assert resumed.collate_next() == upcoming


@pytest.mark.parametrize("fused", [False, True])
def test_guarded_step_never_applies_a_non_finite_update(accelerator, fused):
    config = TrainSettings(optim={"lr": 0.1, "fused": fused})
    model, optimizer, scheduler = _parts(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(torch.randn(3, 4)).pow(2).mean() * float("nan")
    loss.backward()
    assert skips_on_device(optimizer, accelerator) is fused
    if fused:  # deferred: the kernel skips the update; the caller checks with the step's metrics
        norm = guarded_step(accelerator, model, optimizer, scheduler, 1.0, 7, loss.detach()[None], defer_check=True)
        assert not torch.isfinite(norm)
    else:
        with pytest.raises(NonFiniteError, match="at step 7"):
            guarded_step(accelerator, model, optimizer, scheduler, 1.0, 7, loss.detach()[None], defer_check=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
