"""Tokenization, truncation, completion-only labels, collation layouts and the resumable sampler."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from alignment.batching import (
    LengthGroupedSampler,
    Truncation,
    collate_pairs,
    collate_sequences,
    decode_prompt,
    encode_prompt,
    read_rows,
    tokenize_demonstrations,
    tokenize_pairs,
)
from tests.tiny_models import make_tokenizer


def test_decode_prompt_plain_and_chat():
    assert decode_prompt({"prompt": "hi", "is_chat": False}) == "hi"
    msgs = [{"role": "user", "content": "review the movie"}]
    assert decode_prompt({"prompt": json.dumps(msgs), "is_chat": True}) == msgs
    with pytest.raises(ValueError, match="role"):
        decode_prompt({"prompt": json.dumps([{"text": "x"}]), "is_chat": True})


def test_chat_prompt_goes_through_template():
    tok = make_tokenizer()
    ids = encode_prompt(tok, [{"role": "user", "content": "review the movie"}])
    assert tok.decode(ids) == "user : review the movie . assistant :"


def test_truncation_keeps_prompt_end_and_bos_and_cuts_completion():
    trunc = Truncation(max_length=8, max_prompt_length=4, bos_token_id=2)
    prompt, (completion,) = trunc.apply([2, 10, 11, 12, 13, 14], [[20, 21, 22, 23, 24, 25]])
    assert prompt == [2, 12, 13, 14]  # BOS kept, then the end of the prompt
    assert completion == [20, 21, 22, 23]  # the start of the completion, up to max_length
    no_bos = Truncation(max_length=8, max_prompt_length=3)
    assert no_bos.apply([10, 11, 12, 13], [[20]])[0] == [11, 12, 13]
    assert Truncation(8, 4, mode="drop").apply([1, 2, 3, 4, 5], [[6]]) is None
    assert Truncation(8, 4, mode="drop").apply([1, 2], [[6]]) == ([1, 2], [[6]])


def _check_targets(batch, prompts, completions):
    """Every completion token (and nothing else) is a target, predicted from the position before it."""
    flat_ids = batch["input_ids"].flatten()
    labels = batch["labels"].flatten()
    idx = batch["target_index"]
    assert torch.equal(labels[idx], batch["target_ids"])
    assert int((labels != -100).sum()) == len(idx) == sum(len(c) for c in completions)
    assert torch.equal(flat_ids[idx + 1], batch["target_ids"])  # shifted: position t predicts t+1
    for i, c in enumerate(completions):
        assert batch["target_ids"][batch["target_seq"] == i].tolist() == c


def test_collate_completion_only_labels_padded_and_packed():
    prompts, completions = [[5, 6, 7], [8], [9, 10]], [[20, 21], [22, 23, 24], [25]]
    padded = collate_sequences(prompts, completions, pad_id=0)
    assert padded["input_ids"].shape == (3, 5)
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert padded["labels"].tolist() == [[-100, -100, 20, 21, -100], [22, 23, 24, -100, -100], [-100, 25, -100, -100, -100]]
    _check_targets(padded, prompts, completions)
    # packing: first fit decreasing into rows as wide as the longest sequence (6 tokens here)
    p2, c2 = [[1, 2, 3], [4], [5, 6], [7, 8]], [[10, 11, 12], [13], [14], [15, 16]]
    packed = collate_sequences(p2, c2, pad_id=0, packing=True)
    assert "attention_mask" not in packed
    assert packed["input_ids"].tolist() == [[1, 2, 3, 10, 11, 12], [7, 8, 15, 16, 4, 13], [5, 6, 14, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert packed["last_index"].tolist() == [5, 11, 14, 9]
    _check_targets(packed, p2, c2)
    multiple = collate_sequences(prompts, completions, pad_id=0, pad_to_multiple_of=8)
    assert multiple["input_ids"].shape == (3, 8)


def test_pairs_are_one_batch_chosen_then_rejected(tmp_path):
    tok = make_tokenizer()
    rows = [{"prompt": "review the movie", "is_chat": False, "chosen": "good", "rejected": "very bad", "weight": 0.5}]
    examples, stats = tokenize_pairs(tok, rows, Truncation(32, 16))
    assert stats == {"truncated": 0, "dropped": 0}
    assert examples[0]["chosen"] == tok("good")["input_ids"] + [tok.eos_token_id]
    batch = collate_pairs(examples * 2, pad_id=tok.pad_token_id)
    assert batch["num_sequences"] == 4 and batch["weight"].tolist() == [0.5, 0.5]
    assert batch["target_ids"][batch["target_seq"] == 2].tolist() == examples[0]["rejected"]


def test_bad_rows_name_row_and_column(tmp_path):
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="row 1: column 'rejected'"):
        tokenize_pairs(tok, [{"prompt": "a", "chosen": "good", "rejected": "bad"},
                             {"prompt": "a", "chosen": "good", "rejected": None}], Truncation(32, 16))
    with pytest.raises(ValueError, match="row 0: column 'weight'"):
        tokenize_demonstrations(tok, [{"prompt": "a", "response": "good", "weight": float("nan")}], Truncation(32, 16))
    import datasets

    datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}).save_to_disk(tmp_path / "ds")
    assert read_rows(tmp_path / "ds", ["prompt", "chosen", "rejected"]) == [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    path = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ["a"], "chosen": ["b"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        read_rows(path, ["prompt", "chosen", "rejected"])


def test_sampler_seeded_grouped_sharded_and_resumable():
    lengths = [(i * 7919) % 50 + 1 for i in range(100)]
    a = LengthGroupedSampler(lengths, 4, seed=3)
    b = LengthGroupedSampler(lengths, 4, seed=3)
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert LengthGroupedSampler(lengths, 4, seed=4).epoch_batches(0) != a.epoch_batches(0)
    # every example once per epoch; grouping cuts padding against a plain shuffle
    assert sorted(i for batch in a.epoch_batches(0) for i in batch) == list(range(100))
    plain = LengthGroupedSampler(lengths, 4, seed=3, group_by_length=False)

    def padding(s):
        return sum(max(lengths[i] for i in bt) * len(bt) - sum(lengths[i] for i in bt) for bt in s.epoch_batches(0))

    assert padding(a) < padding(plain) / 3
    # two processes split each global batch without overlap
    r0 = LengthGroupedSampler(lengths, 4, seed=3, num_replicas=2, rank=0).epoch_batches(0)
    r1 = LengthGroupedSampler(lengths, 4, seed=3, num_replicas=2, rank=1).epoch_batches(0)
    assert len(r0) == len(r1) == 12 and all(not set(x) & set(y) for x, y in zip(r0, r1, strict=True))
    # resume: a fresh sampler restored mid-epoch-2 continues identically
    straight = [a.next_batch() for _ in range(60)]
    c = LengthGroupedSampler(lengths, 4, seed=3)
    first = [c.next_batch() for _ in range(37)]
    d = LengthGroupedSampler(lengths, 4, seed=3)
    d.load_state_dict(c.state_dict())
    assert first + [d.next_batch() for _ in range(23)] == straight
    with pytest.raises(ValueError, match="batches per epoch"):
        LengthGroupedSampler(lengths[:50], 4, seed=3).load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        LengthGroupedSampler([1, 2, 3], 4)
