"""Two DDP processes (gloo on CPU, via torchrun) train like one process with the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignment.config import DPOConfig
from alignment.recipes.dpo import DPORecipe
from tests.tiny_models import make_tiny_model, preference_pairs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    model = make_tiny_model(tmp_path / "llama", "llama")  # no dropout: both runs see the same math
    preference_pairs(48).to_parquet(tmp_path / "pairs.parquet")
    settings = {"model": {"name_or_path": str(model)}, "train_path": str(tmp_path / "pairs.parquet"),
                "max_steps": 4, "packing": True, "beta": 0.5, "optim": {"lr": 1e-3, "schedule": "constant"}}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump({**settings, "batch_size": 4, "output_dir": str(tmp_path / "ddp")}))
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir", str(tmp_path / "elastic"),
         "-m", "alignment.train", "dpo",
         "--config", str(tmp_path / "ddp.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    DPORecipe(DPOConfig(**settings, batch_size=8, output_dir=str(tmp_path / "one"))).run()

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["phase"] == "train"]

    assert len(losses("ddp")) == 4  # one stream, written by the main process only
    torch.testing.assert_close(losses("ddp"), losses("one"), rtol=1e-5, atol=1e-6)
    ddp = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-5)  # Adam steps are 1e-3
    ckpt = tmp_path / "ddp" / "checkpoints" / "step-000004"
    assert (ckpt / "rng.json").exists() and (ckpt / "rng-1.json").exists() and (ckpt / "rng-1.safetensors").exists()
    assert not list(ckpt.glob("*.pt"))
