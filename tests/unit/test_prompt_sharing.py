"""Prompt-sharing pair batches (``share_prompt``) against the plain layout, at fp32 on tiny models.

The layout is checked by hand on a three-token example; then on GPT-2 (learned positions) and
Llama (rotary) the shared batch must give the padded batch's per-token log-probs, DPO loss and
gradients, through the hidden-state head and the full-logit path, and the reward model's
scores and gradients.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment.batching import Truncation, collate_pairs, tokenize_pairs
from alignment.losses import dpo_loss, reward_loss
from alignment.models import CausalLMLogps, ScalarReward, shared_prompt_supported
from alignment.prompt_sharing import collate_shared_prompt, shared_prompt_mask
from tests.tiny_models import grads_of, preference_pairs


def test_layout_by_hand():
    # prompt [11, 12], chosen [21], rejected [31, 32]; a second pair with no prompt.
    b = collate_shared_prompt([[11, 12], []], [[21], [41, 42]], [[31, 32], [51]], pad_id=0, packing=True)
    # Groups of 5 and 3 tokens: width 5, so they take one row each (the second padded by 2).
    assert b["input_ids"].tolist() == [[11, 12, 21, 31, 32], [41, 42, 51, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 1, 0, 0, 1]]
    # Targets: chosen 21 from position 1 (the last prompt token); rejected 31 also from position
    # 1 (shared), 32 from position 3. No prompt: the first response token has no predictor.
    assert b["target_index"].tolist() == [1, 5, 1, 3]  # 42 from 41 at flat index 5
    assert b["target_ids"].tolist() == [21, 42, 31, 32]
    assert b["target_seq"].tolist() == [0, 1, 2, 2]  # chosen 0, 1 then rejected 2, 3; rejected 51 has none
    assert b["last_index"].tolist() == [2, 6, 4, 7]
    assert b["num_sequences"] == 4 and b["num_tokens"] == 2 * 2 + 1 + 2 + 2 + 1 and b["num_model_tokens"] == 8
    mask = shared_prompt_mask(b["share_group"], b["share_segment"])[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # chosen: prompt + itself
        [1, 1, 0, 1, 0],  # rejected: prompt + itself, never the chosen token
        [1, 1, 0, 1, 1],
    ]
    second = shared_prompt_mask(b["share_group"], b["share_segment"])[1, 0].int().tolist()
    assert second[2] == [0, 0, 1, 0, 0]  # rejected with no prompt sees only itself
    assert second[3] == [0, 0, 0, 1, 0] and second[4] == [0, 0, 0, 1, 1]  # padding: a group of its own


def test_packing_puts_several_groups_in_a_row():
    b = collate_shared_prompt([[1] * 6, [2], [3]], [[4] * 3, [5], [6]], [[7] * 3, [8], [9]], pad_id=0)
    # Groups of 12, 3 and 3 tokens, rows 12 wide: the two short groups share the second row.
    assert b["input_ids"].tolist() == [[1] * 6 + [4] * 3 + [7] * 3, [2, 5, 8, 3, 6, 9] + [0] * 6]
    assert b["position_ids"][1].tolist() == [0, 1, 1, 0, 1, 1, 0, 1, 2, 3, 4, 5]
    mask = shared_prompt_mask(b["share_group"], b["share_segment"])[1, 0].int()
    assert mask[3:6, :3].sum() == 0 and mask[:3, 3:].sum() == 0  # groups never see each other
    assert b["target_index"].tolist()[-2:] == [12, 15] and b["last_index"].tolist()[-2:] == [14, 17]


@pytest.fixture(scope="module")
def batches(tokenizer):
    rows = preference_pairs(6, seed=4, chat_every=3).to_dict("records")
    examples, _ = tokenize_pairs(tokenizer, rows, Truncation(64, 32, "truncate", tokenizer.bos_token_id))
    padded = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=False)
    shared = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=True, share_prompt=True)
    assert shared["num_model_tokens"] < padded["attention_mask"].sum()  # the prompts really run once
    assert shared["num_tokens"] == padded["num_tokens"]
    return padded, shared, len(examples)


@pytest.mark.parametrize("hidden_path", [True, False])
def test_shared_prompt_gives_the_plain_log_probs_loss_and_gradients(folder, batches, hidden_path):
    padded, shared, n = batches
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert shared_prompt_supported(model)
    module = CausalLMLogps(model, chunk_size=8)
    module.use_hidden = hidden_path
    ref = torch.randn(2 * n, generator=torch.Generator().manual_seed(0)) - 20.0
    results = []
    for batch in (padded, shared):
        out = module(batch)
        loss = dpo_loss(out["seq_logps"][:n], out["seq_logps"][n:], ref[:n], ref[n:], beta=0.5)[0].mean()
        loss.backward()
        results.append((out["token_logps"].detach(), out["seq_tokens"], loss.detach(), grads_of(model)))
    (tok_a, count_a, loss_a, grads_a), (tok_b, count_b, loss_b, grads_b) = results
    torch.testing.assert_close(tok_b, tok_a, atol=1e-5, rtol=1e-5)
    assert torch.equal(count_a, count_b)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads_b, grads_a, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_shared_prompt_gives_the_plain_rewards_and_gradients(folder, tokenizer):
    rows = preference_pairs(5, seed=6).to_dict("records")
    examples, _ = tokenize_pairs(tokenizer, rows, Truncation(64, 32, "truncate", None), append_eos=False)
    padded = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=False)
    shared = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=True, share_prompt=True)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    scorer, n = ScalarReward(model), len(examples)
    want = scorer(padded)
    reward_loss(want[:n], want[n:]).mean().backward()
    want_grads = grads_of(model)
    got = scorer(shared)
    reward_loss(got[:n], got[n:]).mean().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads_of(model), want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-4)
