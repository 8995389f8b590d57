"""FSDP checkpoints are JSON + safetensors like every other (issue 14, point 4: no pickles), and a
run killed after one resumes to the numbers of an uninterrupted run.

FSDP2 (``fully_shard``) runs on CPU with gloo in torch 2.13, so two real processes shard a tiny
Llama (tests/integration/fsdp_checkpoint_worker.py): an uninterrupted reference, a run SIGKILLed
one step after its checkpoint, and a restart that restores it (on spoiled weights) and finishes.
accelerate itself does not switch to FSDP on CPU (it stays MULTI_CPU, i.e. DDP), so the worker
shards the model as accelerate's FSDP2 plugin does and calls the same Checkpointer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _launch(mode: str, out: Path, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
         "tests.integration.fsdp_checkpoint_worker", mode, str(out), str(model)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)


def _losses(out: Path, mode: str) -> dict:
    return {rank: json.loads((out / f"losses-{mode}-{rank}.json").read_text()) for rank in (0, 1)}


@pytest.mark.slow
def test_an_fsdp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_numbers_with_no_pickles(tmp_path):
    model = make_tiny_model(tmp_path / "llama", "llama")
    reference, chain = tmp_path / "reference", tmp_path / "chain"
    done = _launch("reference", reference, model)
    assert done.returncode == 0, done.stderr[-4000:]
    crashed = _launch("crash", chain, model)
    assert crashed.returncode != 0 and "exitcode: -9" in crashed.stderr, crashed.stderr[-4000:]  # SIGKILL
    assert not (chain / "final-crash.safetensors").exists()
    resumed = _launch("resume", chain, model)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    want, got = load_file(str(reference / "final-reference.safetensors")), load_file(str(chain / "final-resume.safetensors"))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    before = load_file(str(model / "model.safetensors"))
    assert any(not torch.equal(want[n], before[n]) for n in before)  # it trained
    for rank in (0, 1):  # the steps after the checkpoint see the same losses
        ref, res = _losses(reference, "reference")[rank], _losses(chain, "resume")[rank]
        assert list(res) == ["3", "4"] and res == {k: ref[k] for k in res}

    ckpt = chain / "checkpoints" / "step-000002"
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
                                       "state.json", "config.json", "rng.json", "rng-1.json", "rng-1.safetensors"}
    for path in files:  # nothing but JSON and safetensors: no pickle anywhere
        assert path.suffix in (".json", ".safetensors"), path
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            assert load_file(str(path)) is not None
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".pt", ".bin", ".pkl") or p.name == "fsdp"]
    weights = load_file(str(ckpt / "model.safetensors"))
    assert {n: t.shape for n, t in weights.items()} == {n: t.shape for n, t in before.items()}  # full, not shards
    optimizer = json.loads((ckpt / "optimizer.json").read_text())
    assert set(optimizer["state"]) == set(before)  # keyed by parameter names, not ids


def test_an_earlier_fsdp_checkpoint_of_accelerate_pickles_is_refused_unread(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch import nn

    from alignment.config import TrainSettings
    from alignment.recipes.checkpoint import Checkpointer, ResumeConfigError, is_sharded

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        acc, config = Accelerator(cpu=True), TrainSettings(output_dir=str(tmp_path))
        model = nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        assert not is_sharded({"m.safetensors": model}, acc)  # one process: the plain path
        ckpt = Checkpointer(tmp_path, acc, config)
        path = ckpt.save(1, {"m.safetensors": model}, optimizer, scheduler, {}, {"step": 1})
        (path / "fsdp").mkdir()
        torch.save({"x": 1}, path / "fsdp" / "optimizer.bin")  # what accelerate's save_state wrote before
        with pytest.raises(ResumeConfigError, match=r"it holds fsdp/, torch pickles"):
            ckpt.load(path, {"m.safetensors": model}, optimizer, scheduler, torch.device("cpu"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
