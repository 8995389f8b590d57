"""Response groups (``share_responses`` of the DPO and reward recipes): each distinct prompt of a
batch and each distinct response of it run once, and every pair is scored from them.

The layout is checked by hand; on GPT-2 (learned positions) and Llama (rotary) a grouped batch of
rankings compared in all their pairs must give the plain layout's rewards (and DPO's log-probs),
losses and gradients while running fewer tokens; the pair layout of ``share_prompt`` is the K = 2 case and stays as it was; the
sampler keeps a prompt's pairs together, covers each pair once an epoch and resumes.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignment.batching import LengthGroupedSampler, Truncation, collate_pairs, pair_halves, tokenize_pairs
from alignment.losses import dpo_loss, reward_loss
from alignment.models import CausalLMLogps, ScalarReward
from alignment.prompt_sharing import MAX_RESPONSES, collate_response_groups, shared_prompt_mask
from tests.tiny_models import grads_of, ranked_pairs


def test_layout_by_hand():
    # Prompt [11, 12] ranks three responses, compared in all three pairs; a second prompt [13] has one pair.
    a, b, c = [21], [31, 32], [41]
    batch = collate_response_groups([[11, 12], [11, 12], [13], [11, 12]], [a, a, [51], b], [b, c, [61], c],
                                    pad_id=0, packing=True)
    # Sequences in order of first appearance: a 0, b 1, c 2, [51] 3, [61] 4.
    assert batch["pair_chosen"].tolist() == [0, 0, 3, 1] and batch["pair_rejected"].tolist() == [1, 2, 4, 2]
    assert batch["input_ids"].tolist() == [[11, 12, 21, 31, 32, 41], [13, 51, 61, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 2], [0, 1, 1, 0, 1, 2]]
    assert batch["share_segment"].tolist()[0] == [0, 0, 1, 2, 2, 3]
    # Each response's first token is predicted from its prompt's last token.
    assert batch["target_index"].tolist() == [1, 1, 3, 1, 6, 6]
    assert batch["target_ids"].tolist() == [21, 31, 32, 41, 51, 61]
    assert batch["target_seq"].tolist() == [0, 1, 1, 2, 3, 4]
    assert batch["last_index"].tolist() == [2, 4, 5, 7, 8]
    assert batch["num_sequences"] == 5 and batch["num_model_tokens"] == 9
    assert batch["num_tokens"] == (2 * 2 + 1 + 2) + (2 * 2 + 1 + 1) + (2 * 1 + 1 + 1) + (2 * 2 + 2 + 1)
    mask = shared_prompt_mask(batch["share_group"], batch["share_segment"])[0, 0].int().tolist()
    assert mask[5] == [1, 1, 0, 0, 0, 1]  # c sees the prompt and itself, never a or b
    assert mask[4] == [1, 1, 0, 1, 1, 0]


def test_a_pair_whose_responses_are_equal_points_at_one_sequence():
    batch = collate_response_groups([[1]], [[2, 3]], [[2, 3]], pad_id=0)
    assert batch["num_sequences"] == 1 and batch["pair_chosen"].tolist() == batch["pair_rejected"].tolist() == [0]


def assert_same_pairs(model, plain: dict, grouped: dict, per_pair, loss_of) -> None:
    """``per_pair(batch)`` (chosen, rejected) and the gradients of ``loss_of(chosen, rejected)`` agree on
    the plain and the grouped batch (fp32; only the float summation order may differ)."""
    results = []
    for batch in (plain, grouped):
        chosen, rejected = per_pair(batch)
        loss = loss_of(chosen, rejected)
        loss.backward()
        results.append((chosen.detach(), rejected.detach(), loss.detach(), grads_of(model)))
    (c_want, r_want, loss_want, grads_want), (c_got, r_got, loss_got, grads_got) = results
    torch.testing.assert_close(c_got, c_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_got, r_want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_got, loss_want, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["last", "sum"])
def test_groups_give_the_plain_rewards_loss_and_gradients_on_fewer_tokens(folder, tokenizer, pooling):
    rows = ranked_pairs(4, 4, seed=3).to_dict("records")  # 4 prompts x 6 pairs
    examples, _ = tokenize_pairs(tokenizer, rows, Truncation(64, 32, "truncate", None), append_eos=False)
    padded = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=False)
    grouped = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=True, share_prompt=True,
                            share_responses=True)
    assert grouped["num_sequences"] == 16  # the 4 responses of each prompt, once
    assert grouped["num_tokens"] == padded["num_tokens"]
    assert grouped["num_model_tokens"] < 0.4 * int(padded["attention_mask"].sum())
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    model.config.reward_pooling = pooling
    scorer = ScalarReward(model)
    assert_same_pairs(model, padded, grouped, lambda b: pair_halves(scorer(b), b),
                      lambda c, r: reward_loss(c, r).mean())


def test_a_sampler_with_groups_keeps_them_together_covers_each_pair_once_and_resumes():
    groups = [g for g in range(30) for _ in range(1 + g % 6)]  # 30 prompts with 1 to 6 pairs each
    lengths = [10 + (7 * i) % 23 for i in range(len(groups))]
    sampler = LengthGroupedSampler(lengths, 8, seed=4, groups=groups, megabatch_factor=2)
    batches = sampler.global_batches(0)
    order = [i for b in batches for i in b]
    assert len(batches) == len(groups) // 8 and len(set(order)) == len(order)
    for b in batches:  # inside a batch, each group's pairs are consecutive
        runs = [g for g, _ in itertools.groupby(groups[i] for i in b)]
        assert len(runs) == len(set(runs))
    # A group is cut only where a batch ends: at most one group per batch boundary spans two batches.
    touched = {g: sum(any(groups[i] == g for i in b) for b in batches) for g in set(groups)}
    assert max(touched.values()) <= 2 and sum(t - 1 for t in touched.values() if t) <= len(batches)
    plain = LengthGroupedSampler(lengths, 8, seed=4, megabatch_factor=2).global_batches(0)
    assert sum(len({groups[i] for i in b}) for b in batches) < 0.6 * sum(len({groups[i] for i in b}) for b in plain)
    assert sampler.global_batches(1) != batches and LengthGroupedSampler(
        lengths, 8, seed=4, groups=groups, megabatch_factor=2).global_batches(0) == batches
    # Two processes: consecutive slices of each global batch, together the one-process batch.
    halves = [LengthGroupedSampler(lengths, 4, seed=4, groups=groups, megabatch_factor=2, num_replicas=2, rank=r)
              for r in (0, 1)]
    for b, (x, y) in zip(batches, zip(*(h.epoch_batches(0) for h in halves), strict=True), strict=True):
        assert x + y == b
    # Resume: a sampler restored mid-epoch gives the rest of an uninterrupted run's batches.
    run = [sampler.next_batch() for _ in range(len(batches) + 3)]
    again = LengthGroupedSampler(lengths, 8, seed=4, groups=groups, megabatch_factor=2)
    for _ in range(5):
        again.next_batch()
    state = again.state_dict()
    resumed = LengthGroupedSampler(lengths, 8, seed=4, groups=groups, megabatch_factor=2)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(len(run) - 5)] == run[5:]


def test_groups_give_the_plain_dpo_log_probs_loss_and_gradients(folder, tokenizer):
    rows = ranked_pairs(3, 4, seed=5).to_dict("records")
    examples, _ = tokenize_pairs(tokenizer, rows, Truncation(64, 32, "truncate", tokenizer.bos_token_id))
    padded = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=False)
    grouped = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=True, share_prompt=True,
                            share_responses=True)
    assert grouped["num_sequences"] == 12
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    module = CausalLMLogps(model, chunk_size=8)
    ref = torch.randn(2 * len(examples), generator=torch.Generator().manual_seed(0)) - 20.0
    n = len(examples)
    assert_same_pairs(model, padded, grouped, lambda b: pair_halves(module(b)["seq_logps"], b),
                      lambda c, r: dpo_loss(c, r, ref[:n], ref[n:], beta=0.5)[0].mean())


def test_every_pair_points_at_its_own_tokens_even_when_a_prompt_has_more_responses_than_a_group_holds():
    rng = random.Random(7)
    prompts, chosen, rejected = [], [], []
    pool = {p: [[rng.randint(5, 60) for _ in range(rng.randint(1, 4))] for _ in range(130)] for p in (1, 2, 3)}
    for _ in range(200):  # prompt 1 compares 130 responses: more than MAX_RESPONSES, so it takes two groups
        p = rng.choice((1, 1, 2, 3))
        a, b = rng.sample(range(len(pool[p])), 2)
        prompts.append([p, 4])
        chosen.append(pool[p][a])
        rejected.append(pool[p][b])
    batch = collate_response_groups(prompts, chosen, rejected, pad_id=0, packing=True)
    tokens = {}
    for s, t in zip(batch["target_seq"].tolist(), batch["target_ids"].tolist(), strict=True):
        tokens.setdefault(s, []).append(t)
    assert max(batch["share_segment"].flatten().tolist()) <= MAX_RESPONSES
    for i in range(len(prompts)):
        assert tokens[batch["pair_chosen"][i].item()] == chosen[i]
        assert tokens[batch["pair_rejected"][i].item()] == rejected[i]
    assert batch["num_model_tokens"] < batch["num_tokens"] / 2
