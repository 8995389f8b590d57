"""Issue 19 (1): a GPU config on a CPU makes progress, and a stage that makes none says so.

``compile`` and ``varlen_attention`` are switched off off-CUDA with one log line naming the
field (they hang for minutes in inductor or fail in fp32); the launcher's :class:`StallWatch`
warns, naming the stage, when a training process writes no metrics line for a while.
"""

from __future__ import annotations

import logging

import pytest
import torch

from alignment.config import DPOConfig
from alignment.fast_paths import usable_fast_paths
from alignment.recipes import get_recipe
from tasks.launcher import StallWatch, run_recipe
from tests.tiny_models import make_tiny_model, preference_pairs


def test_gpu_fast_paths_are_switched_off_off_cuda_with_one_line_each():
    compile_, varlen, notes = usable_fast_paths(True, True, "cpu", torch.bfloat16)
    assert (compile_, varlen) == (False, False)
    assert len(notes) == 2 and notes[0].startswith("compile: off on cpu") and notes[1].startswith("varlen_attention")
    # on CUDA the flash kernel needs half precision: fp32 switches varlen off, compile stays
    compile_, varlen, notes = usable_fast_paths(True, True, "cuda", torch.float32)
    assert (compile_, varlen) == (True, False) and "precision: bf16" in notes[0]
    assert usable_fast_paths(True, True, "cuda", torch.bfloat16) == (True, True, [])
    assert usable_fast_paths(False, False, "cpu", torch.float32) == (False, False, [])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_dpo_recipe_with_the_gpu_example_fast_paths_does_not_compile_on_cpu(tmp_path, caplog):
    folder = make_tiny_model(tmp_path / "m", "llama")
    preference_pairs(16).to_parquet(tmp_path / "pairs.parquet")
    # the fast-path fields of configs/examples/qwen-lora-dpo.yaml
    cfg = DPOConfig(model={"name_or_path": str(folder)}, train_path=str(tmp_path / "pairs.parquet"),
                    output_dir=str(tmp_path / "run"), batch_size=4, max_length=48, max_prompt_length=16,
                    precision="bf16", compile=True, packing=True, varlen_attention=True)
    recipe = get_recipe("dpo")(cfg)
    with caplog.at_level(logging.WARNING, logger="alignment.recipes.base"):
        try:
            recipe.setup()
            layers = [m for m in recipe.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
            assert layers and all(getattr(m, "_compiled_call_impl", None) is None for m in layers)
            assert not any(getattr(m, "varlen_attention", False) for m in recipe.train_module.modules())
        finally:
            recipe.cleanup()
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("compile: off on cpu") for m in lines) == 1
    assert sum(m.startswith("varlen_attention: off on cpu") for m in lines) == 1


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_stall_watch_warns_naming_the_stage_and_the_seconds_since_the_last_step(tmp_path, caplog):
    metrics, clock = tmp_path / "metrics.jsonl", _Clock()
    watch = StallWatch(metrics, "train dpo", 60, clock=clock)
    clock.now = 59
    assert watch.check() is None
    clock.now = 61
    with caplog.at_level(logging.WARNING, logger="tasks.launcher"):
        first = watch.check()
    assert first.startswith("stage train dpo: no training step for 61 s (since it started, none yet)")
    assert any("stage train dpo" in r.getMessage() for r in caplog.records)
    clock.now = 100
    assert watch.check() is None  # once per period, not every poll
    metrics.write_text('{"step": 1, "loss": 0.7}\n')
    clock.now = 130
    assert watch.check() is None  # a step is progress
    clock.now = 191
    assert watch.check().startswith("stage train dpo: no training step for 61 s (since its last step)")
    assert StallWatch(metrics, "x", None, clock=clock).check() is None  # switched off


@pytest.mark.slow
def test_run_recipe_warns_while_a_training_process_has_made_no_step(tmp_path, caplog):
    folder = make_tiny_model(tmp_path / "m", "gpt2")
    preference_pairs(8).to_parquet(tmp_path / "pairs.parquet")
    cfg = DPOConfig(model={"name_or_path": str(folder)}, train_path=str(tmp_path / "pairs.parquet"),
                    batch_size=4, max_steps=1, max_length=48, max_prompt_length=16)
    with caplog.at_level(logging.WARNING, logger="tasks.launcher"):
        summary = run_recipe("dpo", cfg, tmp_path / "run", description="dpo", stall_warning_s=1)
    assert summary["finished"]
    # starting python + torch + transformers takes longer than 1 s before the first step
    assert any(r.getMessage().startswith("stage dpo: no training step for") for r in caplog.records)
