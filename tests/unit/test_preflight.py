"""Issue 19 (3): mistakes that can be seen before the first stage stop the run at once, with one
line naming the field, before any Prefect server starts (tasks/preflight.py, flows/cli.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.config import load_pipeline_config
from tasks.preflight import PreflightError, check_batch_fits, preflight, run_preflight
from tests.tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_64(tmp_path_factory):
    """A tiny Llama with 64 positions (rotary: the count is only a config number)."""
    folder = make_tiny_model(tmp_path_factory.mktemp("m64"), "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    return folder


def _config(tmp_path: Path, model: str, **sections) -> Path:
    landing = tmp_path / "landing"
    landing.mkdir(exist_ok=True)
    data = {"pipeline": {"name": "mine", "home": str(tmp_path / "home")},
            "data": {"landing_dir": str(landing)},
            "model": {"policy": {"name_or_path": model}},
            "reward": {"max_length": 48, "max_prompt_length": 16},
            "dpo": {"max_length": 48, "max_prompt_length": 16},
            "evaluation": {"max_prompt_length": 16, "generation": {"max_new_tokens": 8}, "max_length": 48}}
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _error(path: Path, *overrides: str) -> str:
    with pytest.raises(PreflightError) as info:
        preflight(load_pipeline_config(path, list(overrides)))
    return str(info.value)


def test_a_good_config_passes(tmp_path, model_64):
    assert preflight(load_pipeline_config(_config(tmp_path, str(model_64)))) == []


@pytest.mark.parametrize("typo", ["{m}s", "./no/such/model", "~/no-such-model-folder/"])
def test_a_typo_in_a_local_model_path_is_named(tmp_path, model_64, typo):
    ref = typo.format(m=model_64)
    msg = _error(_config(tmp_path, ref))
    assert msg.startswith(f"model.policy.name_or_path: {ref} does not exist")


def test_a_hub_id_that_cannot_be_fetched_offline_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _error(_config(tmp_path, "no-such-org/no-such-model-19"))
    assert msg.startswith("model.policy.name_or_path: no-such-org/no-such-model-19 is not a local folder")


def test_a_folder_whose_tokenizer_does_not_load_is_named(tmp_path):
    folder = make_tiny_model(tmp_path / "broken", "gpt2")
    (folder / "tokenizer.json").write_text('{"truncated": ')  # a half-copied file
    msg = _error(_config(tmp_path, str(folder)))
    assert msg.startswith("model.policy.name_or_path: the tokenizer in")


def test_max_length_beyond_the_model_positions_is_named(tmp_path, model_64):
    path = _config(tmp_path, str(model_64))
    assert _error(path, "dpo.max_length=1024").startswith(
        "dpo.max_length: 1024 tokens is more than the 64 positions of model.policy (max_position_embeddings")
    assert _error(path, "reward.max_length=128").startswith("reward.max_length: 128 tokens")
    assert _error(path, "evaluation.generation.max_new_tokens=60").startswith(
        "evaluation.generation.max_new_tokens: 60 new tokens")


def test_response_groups_without_a_shared_prompt_are_named(tmp_path, model_64):
    path = _config(tmp_path, str(model_64))
    assert _error(path, "reward.share_responses=true").startswith(
        "reward.share_responses: runs a prompt's responses after one copy of it; set reward.share_prompt too")
    assert _error(path, "dpo.share_responses=true").startswith("dpo.share_responses:")
    assert preflight(load_pipeline_config(path, ["dpo.share_responses=true", "dpo.share_prompt=true"])) == []


def test_missing_sections_and_sources_are_named(tmp_path, model_64):
    path = tmp_path / "nomodel.yaml"
    path.write_text(yaml.safe_dump({"pipeline": {"name": "mine"}, "data": {"landing_dir": str(tmp_path)}}))
    assert _error(path).startswith("model.policy: not set")
    assert _error(_config(tmp_path, str(model_64)), f"data.landing_dir={tmp_path}/nope").startswith(
        f"data.landing_dir: {tmp_path}/nope is not a folder")


def test_notes_name_the_fields_and_errors_are_one_line(tmp_path, model_64):
    path = _config(tmp_path, str(model_64), dpo={"compile": True}, evaluation={"num_prompts": 3})
    out = io.StringIO()
    assert run_preflight(load_pipeline_config(path), out) == 0
    lines = out.getvalue().splitlines()
    assert any(line.startswith("alignflow: note: evaluation.num_prompts: 3 prompts can never pass") for line in lines)
    out = io.StringIO()
    assert run_preflight(load_pipeline_config(path, ["dpo.max_length=1024"]), out) == 2
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("alignflow: dpo.max_length")


def test_a_batch_larger_than_the_training_split_is_named():
    check_batch_fits("dpo", 8, 1, 8, "pairs-train.parquet")
    with pytest.raises(PreflightError, match=r"^dpo.batch_size: 8 is more than the 5 examples"):
        check_batch_fits("dpo", 8, 1, 5, "pairs-train.parquet")
    with pytest.raises(PreflightError, match=r"^reward.batch_size: 4 x 2 processes"):
        check_batch_fits("reward", 4, 2, 7, "x")


@pytest.mark.slow
def test_cli_refuses_before_prefect_starts_with_one_line(tmp_path):
    path = tmp_path / "nomodel.yaml"
    path.write_text(yaml.safe_dump({"pipeline": {"name": "mine", "home": str(tmp_path / "home")},
                                    "data": {"landing_dir": str(tmp_path)}}))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["alignflow: model.policy: not set; give a hub id or a local model "
                                                "folder (model: {policy: {name_or_path: ...}}), or add a demo section"]
    assert "Traceback" not in proc.stdout + proc.stderr and "prefect" not in (proc.stdout + proc.stderr).lower()
    assert not (tmp_path / "home" / "prefect").exists()  # no embedded Prefect home was created
    assert time.monotonic() - started < 120


def test_the_training_stage_names_a_batch_larger_than_its_split_before_starting_a_process(tmp_path, model_64):
    from tasks.records import ModelRecord
    from tasks.stages.train import train_stage
    from tests.tiny_models import preference_pairs

    cfg = load_pipeline_config(_config(tmp_path, str(model_64)), ["dpo.batch_size=8"])
    preference_pairs(5).to_parquet(tmp_path / "pairs-train.parquet")
    init = ModelRecord(stage="base", path=str(model_64), digest="base", base=str(model_64))
    with pytest.raises(PreflightError, match=r"^dpo.batch_size: 8 is more than the 5 examples"):
        train_stage(cfg, "dpo", {"pairs-train": str(tmp_path / "pairs-train.parquet")}, "d", init, None)
    assert not (tmp_path / "home" / "runs").exists()  # no run folder, no training process


def _without_chat_template(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    config = json.loads((to / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (to / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in to.glob("chat_template*"):
        extra.unlink()
    return to


def test_chat_prompts_for_a_tokenizer_without_a_chat_template_are_named_before_training(tmp_path, model_64):
    from alignment.models import load_tokenizer
    from tasks.records import ModelRecord
    from tasks.stages.train import train_stage
    from tests.tiny_models import preference_pairs

    base = _without_chat_template(model_64, tmp_path / "base-model")  # a base model: no chat template
    preference_pairs(16, chat_every=4).to_parquet(tmp_path / "pairs-train.parquet")  # 4 chat prompts of 16
    init = ModelRecord(stage="base", path=str(base), digest="base", base=str(base))
    data = {"pairs-train": str(tmp_path / "pairs-train.parquet")}
    cfg = load_pipeline_config(_config(tmp_path, str(base)), ["dpo.batch_size=4"])
    with pytest.raises(PreflightError, match=r"^model.policy.chat_template: 4 of the 16 training prompts in .* are "
                                             r"chat conversations and the tokenizer of .* has no chat template"):
        train_stage(cfg, "dpo", data, "d", init, None)
    assert not (tmp_path / "home" / "runs").exists()  # no run folder, no training process

    chatml = cfg.model.policy.model_copy(update={"chat_template": "chatml"})
    tok = load_tokenizer(chatml)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_device_cuda_without_a_cuda_device_is_named(tmp_path, model_64, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU host, also on a GPU one
    msg = _error(_config(tmp_path, str(model_64)), "pipeline.device=cuda")
    assert msg.startswith("pipeline.device: cuda, but torch sees no CUDA device")


def test_qlora_without_bitsandbytes_is_named(tmp_path, model_64, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    msg = _error(_config(tmp_path, str(model_64)), "model.policy.lora.quantize_4bit=true")
    assert msg.startswith("model.policy.lora.quantize_4bit: QLoRA needs the bitsandbytes package")
    monkeypatch.undo()
    assert preflight(load_pipeline_config(_config(tmp_path, str(model_64)), ["model.policy.lora.quantize_4bit=true"])) == []


def test_device_cpu_hides_cuda_from_the_training_process(tmp_path, model_64, monkeypatch):
    """pipeline.device: cpu is honoured by training on a GPU host too: the training process is
    launched with no CUDA device visible (and joins a gloo group when there are several)."""
    import tasks.stages.train as train
    from tasks.records import ModelRecord
    from tests.tiny_models import preference_pairs

    launched: list[dict] = []

    def fake_run_recipe(recipe, settings, run_dir, **kwargs):
        launched.append(kwargs)
        raise RuntimeError("stop after the launch arguments")

    monkeypatch.setattr(train, "run_recipe", fake_run_recipe)
    preference_pairs(8).to_parquet(tmp_path / "pairs-train.parquet")
    init = ModelRecord(stage="base", path=str(model_64), digest="base", base=str(model_64))
    for device, hidden in (("cpu", True), ("auto", False)):
        cfg = load_pipeline_config(_config(tmp_path, str(model_64)), ["dpo.batch_size=2", f"pipeline.device={device}"])
        with pytest.raises(RuntimeError, match="stop after"):
            train.train_stage(cfg, "dpo", {"pairs-train": str(tmp_path / "pairs-train.parquet")}, "d", init, None)
        env = launched[-1]["extra_env"]
        assert (env.get("CUDA_VISIBLE_DEVICES") == "") is hidden
        assert (env.get("ACCELERATE_USE_CPU") == "true") is hidden
