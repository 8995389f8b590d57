"""The GPU fast paths against the plain paths, at fp32 on tiny models on the CPU.

The same comparison ``benchmarks/gpu_bench.py --groups check`` makes on the GPU in bf16: the
optimized DPO / reward-model path (packed batch, label log-probs from hidden states with the
chunked LM head, the fused log-prob block math) must give the plain path's losses, log-probs and
gradients (padded batch, the model's own full-logit forward and log_softmax / pooling). Also:
the static-cache decoder of :mod:`alignment.fast_generation` (eager on CPU; the CUDA graph only
replays it) samples exactly what the default decode loop samples, and the regional compile
helper finds the repeated decoder blocks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import alignment.logprobs as logprobs
from alignment.batching import Truncation, collate_pairs, tokenize_pairs
from alignment.config import GenerationSettings, ModelSettings
from alignment.fast_generation import GraphDecoder, decode_attention, graph_supported
from alignment.fast_paths import (
    compile_layers,
    repeated_blocks,
    set_causal_padding,
    set_varlen_attention,
    varlen_attention,
)
from alignment.generation import KVDecoder, generate
from alignment.losses import dpo_loss, reward_loss
from alignment.models import CausalLMLogps, ScalarReward, load_causal_lm, packing_supported
from tests.tiny_models import grads_of, make_tiny_model, preference_pairs


@pytest.fixture(scope="module")
def batches(tokenizer):
    rows = preference_pairs(5, seed=3).to_dict("records")
    rows[0]["prompt"] += " the film" * 12  # one long pair: shorter sequences then share packed rows
    examples, _ = tokenize_pairs(tokenizer, rows, Truncation(64, 32, "truncate", tokenizer.bos_token_id))
    padded = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=False)
    packed = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # sequences really share rows
    return padded, packed, len(examples)


@pytest.mark.parametrize("fused", [False, True])
def test_dpo_fast_path_equals_plain_path(folder, batches, fused, monkeypatch):
    """Packed + hidden-state chunked log-probs (and the fused block math) = padded full-logit log_softmax."""
    padded, packed, n = batches
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # dropout off (GPT-2 has some)
    logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    labels = padded["labels"]
    tok = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels != -100)
    plain = tok.sum(-1)
    gen = torch.Generator().manual_seed(0)
    ref = plain.detach() + torch.randn(2 * n, generator=gen)  # a reference unequal to the policy
    loss_plain = dpo_loss(plain[:n], plain[n:], ref[:n], ref[n:], beta=0.5)[0].mean()
    loss_plain.backward()
    want = grads_of(model)

    # The fused path's block functions, run eagerly: their math is what torch.compile compiles.
    monkeypatch.setattr(logprobs, "_compiled", lambda fn: fn)
    module = CausalLMLogps(model, chunk_size=8)  # several chunks
    module.compiled_head = fused
    # Packed where the model supports it (Llama); GPT-2 cannot pack, and the recipes then pad.
    fast = module(packed if packing_supported(model) else padded)["seq_logps"]
    loss_fast = dpo_loss(fast[:n], fast[n:], ref[:n], ref[n:], beta=0.5)[0].mean()
    loss_fast.backward()
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(loss_fast, loss_plain, atol=1e-6, rtol=1e-5)
    for got, exp in zip(grads_of(model), want, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-4)


def test_reward_fast_path_equals_hf_pooling(folder, tokenizer):
    """Our packed last-token head = the HF sequence-classification forward on a padded batch."""
    rows = preference_pairs(4, seed=5).to_dict("records")
    examples, _ = tokenize_pairs(tokenizer, rows, Truncation(64, 32, "truncate", None), append_eos=False)
    padded = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=False)
    packed = collate_pairs(examples, pad_id=tokenizer.pad_token_id, packing=True)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    n = len(examples)
    plain = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, 0]
    reward_loss(plain[:n], plain[n:]).mean().backward()
    want = grads_of(model)
    fast = ScalarReward(model)(packed if packing_supported(model) else padded)
    reward_loss(fast[:n], fast[n:]).mean().backward()
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    for got, exp in zip(grads_of(model), want, strict=True):
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("do_sample", [False, True])
def test_static_graph_decoder_samples_what_the_default_loop_samples(folder, tokenizer, do_sample):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = ["the movie was", "review the film and the plot of this very long story", "a",
               [{"role": "user", "content": "tell me about the music"}]]
    settings = GenerationSettings(max_new_tokens=10, do_sample=do_sample, batch_size=3)
    default = generate(model, tokenizer, prompts, settings, seed=7)
    graphed = generate(model, tokenizer, prompts, settings.model_copy(update={"cuda_graphs": True}), seed=7)
    assert torch.equal(graphed.response_ids, default.response_ids)
    assert torch.equal(graphed.response_mask, default.response_mask)
    assert graphed.texts == default.texts


def test_graph_decoder_step_logits_match_kv_decoder(folder):
    """Step by step, the static-cache logits equal the dynamic-cache loop's (left padding included)."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    a, b = KVDecoder(model), GraphDecoder(model)
    assert graph_supported(model) and b.use_graph is None
    with torch.no_grad():
        la, lb = a.prefill(ids, mask, 4), b.prefill(ids, mask, 4)
        assert b.use_graph is False  # CPU: eager static steps
        for token in ([13, 14], [15, 16], [17, 18], [19, 20]):
            torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
            t = torch.tensor(token)
            la, lb = a.step(t), b.step(t)
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="no room"):
            b.step(torch.tensor([1, 1]))


def test_compiled_decode_step_matches_the_eager_loop(folder, tokenizer):
    """The torch.compile'd static step (what GPUs capture) gives the dynamic loop's logits and tokens."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    a, b = KVDecoder(model), GraphDecoder(model, compile_step=True)
    with torch.no_grad():
        la, lb = a.prefill(ids, mask, 3), b.prefill(ids, mask, 3)
        for token in ([13, 14], [15, 16], [17, 18]):
            t = torch.tensor(token)
            la, lb = a.step(t), b.step(t)
            torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
    settings = GenerationSettings(max_new_tokens=6, batch_size=2, cuda_graphs=True)
    default = generate(model, tokenizer, ["the movie was", "a"], settings, seed=3)
    compiled = generate(model, tokenizer, ["the movie was", "a"], settings.model_copy(update={"compile_step": True}),
                        seed=3)
    assert torch.equal(compiled.response_ids, default.response_ids)


def test_compile_layers_finds_the_decoder_blocks(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    blocks = repeated_blocks(model)
    assert len(blocks) == 1 and len(blocks[0]) == model.config.num_hidden_layers
    module = CausalLMLogps(model)
    assert compile_layers(module) is module  # in place: weights and state dict untouched
    assert module.compiled_head
    assert all(layer._compiled_call_impl is not None for layer in blocks[0])


def test_decode_attention_equals_sdpa_with_repeated_heads():
    """Grouped-query attention without repeating K/V = SDPA on explicitly repeated heads."""
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hk, q, T, D = 2, 6, 2, 3, 7, 8
    query, key, value = (torch.randn(B, h, n, D, generator=gen) for h, n in ((Hq, q), (Hk, T), (Hk, T)))
    mask = torch.rand(B, 1, q, T, generator=gen) > 0.4
    mask[..., 0] = True  # every query sees something
    got, _ = decode_attention(None, query, key, value, mask, scaling=0.3)
    rep = Hq // Hk
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), attn_mask=mask, scale=0.3)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_graph_decoder_cache_holds_the_autocast_dtype(folder):
    """Under bf16 autocast over fp32 weights (the trainers' rollouts) keys and values are cached in bf16."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    dec = GraphDecoder(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = dec.prefill(ids, (ids != 0).long(), 3)
        for _ in range(3):
            logits = dec.step(logits.argmax(-1))
    assert dec.cache.layers[0].keys.dtype == torch.bfloat16 == dec.cache.layers[0].values.dtype
    assert torch.isfinite(logits).all()


def test_causal_padding_drops_the_mask_without_changing_results(folder, batches, tokenizer):
    """Right-padded batches give the same log-probs and rewards without their padding mask."""
    padded, _, _ = batches
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    module = CausalLMLogps(model, chunk_size=8)
    with torch.no_grad():
        want = module(padded)["token_logps"]
        assert set_causal_padding(module, True) == 1
        got = module(padded)["token_logps"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    _assert_rewards_unchanged(folder, padded, padded, set_causal_padding)


def test_varlen_attention_equals_block_diagonal_sdpa():
    """Per-sequence causal attention over a flattened row = SDPA with the block-diagonal causal mask."""
    gen = torch.Generator().manual_seed(1)
    Hq, Hk, D, lengths = 6, 2, 8, [5, 1, 7, 3]
    T = sum(lengths)
    query, key, value = (torch.randn(1, h, T, D, generator=gen) for h in (Hq, Hk, Hk))
    cu = torch.tensor([0, 5, 6, 13, 16], dtype=torch.int32)
    got, _ = varlen_attention(None, query, key, value, None, scaling=0.4, cu_seq_lens_q=cu, max_length_q=7)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    t = torch.arange(T)
    mask = (segment[:, None] == segment[None, :]) & (t[None, :] <= t[:, None])
    rep = Hq // Hk
    want = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), attn_mask=mask, scale=0.4)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        varlen_attention(None, query, key, value, None)


def test_varlen_packed_batches_equal_padded_ones(folder, batches):
    """Packed rows through varlen attention give the padded batch's log-probs, gradients and rewards."""
    padded, packed, _ = batches
    assert packed["cu_seq_lens"][0] == 0 and packed["cu_seq_lens"][-1] == packed["input_ids"].numel()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    module = CausalLMLogps(model, chunk_size=8)
    module(padded)["seq_logps"].sum().backward()
    want_grads = grads_of(model)
    with torch.no_grad():
        want = module(padded)["token_logps"]
    assert set_varlen_attention(module, True) == 1
    got = module(packed)
    got["seq_logps"].sum().backward()
    torch.testing.assert_close(got["token_logps"].detach(), want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads_of(model), want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation != "alignflow_varlen"  # switched only around the forward
    _assert_rewards_unchanged(folder, padded, packed, set_varlen_attention)


def test_checkpointed_varlen_backward_equals_the_unchecked_one(tmp_path, batches):
    """gradient_checkpointing with varlen attention: the backward recomputes each layer under the
    attention its forward ran with (it raised CheckpointError, run 17) and gives the same gradients."""
    _, packed, _ = batches
    folder = make_tiny_model(tmp_path / "llama", "llama")  # no dropout: train mode is deterministic
    grads = []
    for ckpt in (False, True):
        model = load_causal_lm(ModelSettings(name_or_path=str(folder), gradient_checkpointing=ckpt)).train()
        module = CausalLMLogps(model, chunk_size=8)
        assert set_varlen_attention(module, True) == 1
        module(packed)["seq_logps"].sum().backward()
        grads.append(grads_of(model))
    for g, w in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def _assert_rewards_unchanged(folder, padded, fast_batch, switch_on):
    """A reward model scores ``fast_batch`` with the fast path switched on as it scores ``padded`` without."""
    scorer = ScalarReward(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval())
    with torch.no_grad():
        want = scorer(padded)
        assert switch_on(scorer, True) == 1
        torch.testing.assert_close(scorer(fast_batch), want, atol=1e-5, rtol=1e-5)
