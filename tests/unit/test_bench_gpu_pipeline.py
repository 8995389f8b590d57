"""The GPU pipeline run's model folder and feedback (benchmarks/gpu_pipeline.py), checked on the CPU."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

pipeline_bench = pytest.importorskip("benchmarks.gpu_pipeline")


def test_byte_tokenizer_reloads_from_a_qwen2_model_folder_with_the_same_ids(tmp_path):
    import torch

    from benchmarks.gpu_bench import build_shape

    folder = build_shape(tmp_path, "tiny", torch.device("cpu"))  # a qwen2 config.json
    tok = pipeline_bench.byte_tokenizer(1000)
    tok.save_pretrained(folder)
    again = AutoTokenizer.from_pretrained(folder)  # through the model type's own tokenizer class
    text = "abc de fghij"
    assert again(text)["input_ids"] == tok(text)["input_ids"] and len(tok(text)["input_ids"]) == len(text)
    assert again.decode(again(text)["input_ids"]) == text
    assert (again.eos_token_id, again.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert len(again.get_vocab()) == 1000


def test_feedback_has_hh_lengths_and_prefers_the_liked_letters():
    rows = pipeline_bench.feedback(400, 100_000, seed=3)
    mean = lambda key: sum(len(r[key]) for r in rows) / len(rows)  # noqa: E731 - one token per character
    assert mean("prompt") == pytest.approx(163.1, rel=0.1) and mean("chosen") == pytest.approx(88.4, rel=0.1)
    liked = lambda s: sum(c in pipeline_bench.LIKED for c in s) / max(1, len(s.replace(" ", "")))  # noqa: E731
    assert sum(liked(r["chosen"]) > liked(r["rejected"]) for r in rows) > 0.9 * len(rows)
    short = pipeline_bench.feedback(200, 256, seed=4)
    assert all(len(r["prompt"]) <= 128 and max(len(r["chosen"]), len(r["rejected"])) < 256 - len(r["prompt"])
               for r in short)
