"""``python -m alignment.train`` end to end in a subprocess: outputs, resume refusal, config errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignment.train import apply_overrides, load_config, main
from tests.tiny_models import demonstrations, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignment.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_overrides_parse_yaml_values_and_name_bad_fields(tmp_path):
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=0.5", "model.lora.r=8", "packing=true"])
    assert data == {"optim": {"lr": 0.5}, "model": {"lora": {"r": 8}}, "packing": True}
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.2\n")
    cfg = load_config("dpo", path, ["loss_type=ipo", "optim.lr=2e-5"])  # YAML reads 2e-5 as text; the config coerces
    assert cfg.loss_type == "ipo" and cfg.optim.lr == 2e-5 and cfg.beta == 0.2
    with pytest.raises(ValueError, match=r"dpo\.beta"):
        load_config("dpo", path, ["beta=-1"])


@pytest.mark.slow
def test_cli_trains_writes_run_folder_and_refuses_changed_config(tmp_path):
    model = make_tiny_model(tmp_path / "model", "llama")
    demonstrations(32).to_parquet(tmp_path / "demos.parquet")
    config = {"model": {"name_or_path": str(model)}, "train_path": str(tmp_path / "demos.parquet"),
              "eval_path": str(tmp_path / "demos.parquet"), "output_dir": str(tmp_path / "run"), "batch_size": 8,
              "max_steps": 3, "save_every": 2, "optim": {"lr": 1e-3}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))

    done = _cli("sft", "--config", str(tmp_path / "sft.yaml"), "--set", "packing=true")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "samples_per_s", "time"} <= set(records[0])
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (run / "final").iterdir()}
    ckpt = run / "checkpoints" / "step-000003"
    assert {"model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json", "rng.json",
            "rng.safetensors", "state.json", "config.json"} <= {
        p.name for p in ckpt.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 3 and summary["tokens_per_s"] > 0

    refused = _cli("sft", "--config", str(tmp_path / "sft.yaml"), "--set", "packing=true", "--set", "optim.lr=0.5")
    assert refused.returncode == 2
    assert "optim.lr: 0.001 -> 0.5" in refused.stderr


def test_cli_exit_code_2_names_the_bad_field(tmp_path, capsys):
    (tmp_path / "sft.yaml").write_text("batch_size: 8\n")
    assert main(["sft", "--config", str(tmp_path / "sft.yaml"), "--set", "batch_size=0"]) == 2
    assert "sft.batch_size: Input should be greater than 0" in capsys.readouterr().err
