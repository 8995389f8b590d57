"""A base model without a chat template, given chat-conversation feedback (an HH-RLHF export), trains
through the whole pipeline once ``model.policy.chat_template`` names one; without it the training
stage stops before starting a process, naming the field (tests/unit/test_preflight.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from flows.pipeline import alignment_pipeline
from tests.integration.test_readme import hh_export
from tests.tiny_models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EXAMPLE = str(Path(__file__).resolve().parents[2] / "configs" / "examples" / "qwen-lora-dpo.yaml")


def test_a_base_model_without_a_chat_template_trains_on_hh_rlhf_with_chatml(prefect_harness, tmp_path,
                                                                           clean_mlflow_env):
    model = make_tiny_model(tmp_path / "base-model", "llama", max_position_embeddings=2048)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # a base model: no chat template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in model.glob("chat_template*"):
        extra.unlink()
    landing = tmp_path / "landing"
    landing.mkdir()
    hh_export(landing / "hh-rlhf.jsonl")  # full conversations: chat prompts
    home = tmp_path / "home"
    out = alignment_pipeline(config=EXAMPLE, overrides=[
        f"pipeline.home={home}", f"data.landing_dir={landing}", f"model.policy.name_or_path={model}",
        f"model.reward.name_or_path={model}", "model.policy.chat_template=chatml", "model.reward.chat_template=chatml"])
    assert out["status"] in ("promoted", "not-promoted"), out
    finals = sorted(home.glob("runs/assistant/*/final"))
    assert {f.parent.name.split("-")[0] for f in finals} == {"reward", "dpo"}
    for final in finals:  # every trained model writes chat prompts as it was trained on them, for evaluation and serving
        assert "<|im_start|>" in AutoTokenizer.from_pretrained(final).chat_template
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(next(home.glob("runs/assistant/dpo-*/final/merged"))).chat_template
