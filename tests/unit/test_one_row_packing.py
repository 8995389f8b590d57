"""One-row packed batches (``one_row``): the layout the recipes use with varlen attention.

Variable-length attention flattens a packed batch's rows into one, so the padded tails of
first-fit-decreasing rows were computed for nothing (about a quarter of the tokens on HH-RLHF
lengths) and the row count changed the compiled layers' input shapes. With ``one_row`` every
sequence goes into a single row padded to a multiple of ``pad_to_multiple_of``; the results
must equal the padded batch's exactly as the FFD-packed layout's do.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import alignment.recipes.base as recipe_base
from alignment.batching import Truncation, collate_pairs, collate_sequences, tokenize_pairs
from alignment.config import DPOConfig
from alignment.fast_paths import set_varlen_attention
from alignment.models import CausalLMLogps
from alignment.recipes import get_recipe
from tests.tiny_models import grads_of, make_tiny_model, preference_pairs


def test_one_row_puts_every_sequence_in_one_row_with_one_tail_segment():
    prompts, completions = [[1, 2, 3], [4], [5, 6], [7, 8]], [[10, 11, 12], [13], [14], [15, 16]]
    batch = collate_sequences(prompts, completions, pad_id=0, packing=True, one_row=True, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 12, 4, 13, 5, 6, 14, 7, 8, 15, 16, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 0, 1, 2, 3, 0]]
    assert batch["cu_seq_lens"].tolist() == [0, 6, 8, 11, 15, 16]  # the tail is a segment of its own
    assert batch["max_seq_len"] == 6
    assert batch["last_index"].tolist() == [5, 7, 10, 14]
    flat_ids, labels = batch["input_ids"].flatten(), batch["labels"].flatten()
    assert torch.equal(labels[batch["target_index"]], batch["target_ids"])
    assert torch.equal(flat_ids[batch["target_index"] + 1], batch["target_ids"])
    for i, c in enumerate(completions):
        assert batch["target_ids"][batch["target_seq"] == i].tolist() == c
    # an exact multiple gets no tail; padded batches ignore one_row
    exact = collate_sequences(prompts, completions, pad_id=0, packing=True, one_row=True, pad_to_multiple_of=5)
    assert exact["input_ids"].shape == (1, 15) and exact["cu_seq_lens"].tolist() == [0, 6, 8, 11, 15]
    padded = collate_sequences(prompts, completions, pad_id=0, one_row=True)
    assert padded["input_ids"].shape == (4, 6) and "attention_mask" in padded


def test_one_row_varlen_batches_equal_padded_ones(folder, tokenizer):
    """Log-probs and gradients through varlen attention on one row = the padded batch's."""
    rows = preference_pairs(5, seed=3).to_dict("records")
    rows[0]["prompt"] += " the film" * 12
    examples, _ = tokenize_pairs(tokenizer, rows, Truncation(64, 32, "truncate", tokenizer.bos_token_id))
    padded = collate_pairs(examples, pad_id=tokenizer.pad_token_id)
    one_row = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=True, one_row=True,
                            pad_to_multiple_of=64)
    assert one_row["input_ids"].shape[0] == 1 and one_row["input_ids"].shape[1] % 64 == 0
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    module = CausalLMLogps(model, chunk_size=8)
    module(padded)["seq_logps"].sum().backward()
    want_grads = grads_of(model)
    with torch.no_grad():
        want = module(padded)["token_logps"]
    set_varlen_attention(module, True)
    got = module(one_row)
    got["seq_logps"].sum().backward()
    torch.testing.assert_close(got["token_logps"].detach(), want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads_of(model), want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_recipes_pack_one_row_exactly_when_varlen_attention_will_run(tmp_path, monkeypatch):
    folder = make_tiny_model(tmp_path / "m", "llama")
    preference_pairs(8).to_parquet(tmp_path / "pairs.parquet")

    def setup(name, **fields):
        cfg = DPOConfig(model={"name_or_path": str(folder)}, train_path=str(tmp_path / "pairs.parquet"),
                        output_dir=str(tmp_path / name), batch_size=4, max_length=48, max_prompt_length=16,
                        packing=True, max_steps=1, **fields)
        run = get_recipe("dpo")(cfg)
        run.setup()
        return run

    def layout(run):
        return run.train_set.collate(run.train_set.examples[:4])["input_ids"].shape

    # on this CPU varlen is switched off: first-fit-decreasing rows as before
    run = setup("cpu", varlen_attention=True)
    assert layout(run)[0] > 1
    run.cleanup()
    # where the fast path runs (a CUDA device in bf16), one row padded to ONE_ROW_MULTIPLE, and it trains
    monkeypatch.setattr(recipe_base, "usable_fast_paths", lambda compile, varlen, device, dtype: (compile, varlen, []))
    run = setup("varlen", varlen_attention=True)
    try:
        rows, width = layout(run)
        assert rows == 1 and width % recipe_base.ONE_ROW_MULTIPLE == 0
        assert any(getattr(m, "varlen_attention", False) for m in run.train_module.modules())
        run.train()
        assert run.step == 1
    finally:
        run.cleanup()
    for name, fields in {"off": {"varlen_attention": False}, "shared": {"varlen_attention": True, "share_prompt": True}}.items():
        run = setup(name, **fields)
        assert layout(run)[0] > 1 or "share_group" in run.train_set.collate(run.train_set.examples[:4])
        run.cleanup()
