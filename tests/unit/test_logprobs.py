"""Chunked log-prob routines against the naive full log_softmax + gather."""

from __future__ import annotations

import pytest
import torch

from alignment.logprobs import (
    NonFiniteError,
    check_finite,
    logps_from_hidden,
    selective_log_softmax,
    sequence_logps,
)


def naive_token_logps(logits, labels, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    safe = labels.clamp_min(0)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out * (labels != -100)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    B, T, V = 3, 9, 17
    logits = torch.randn(B, T, V, generator=gen) * 3
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :4] = -100  # prompt
    labels[1, 6:] = -100  # right padding
    labels[2, :] = -100  # fully masked (truncated away)
    return logits, labels


@pytest.mark.parametrize("chunk", [1, 4, 9, 10, 1000])
def test_selective_log_softmax_equals_naive(batch, chunk):
    logits, labels = batch
    got = selective_log_softmax(logits, labels, chunk)
    torch.testing.assert_close(got, naive_token_logps(logits, labels), atol=1e-5, rtol=1e-5)
    assert got[2].abs().sum() == 0
    hot = selective_log_softmax(logits, labels, chunk, temperature=0.7)
    torch.testing.assert_close(hot, naive_token_logps(logits, labels, 0.7), atol=1e-5, rtol=1e-5)


def test_selective_log_softmax_gradient_and_bf16(batch):
    logits, labels = batch
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    (selective_log_softmax(a, labels, 4, temperature=1.3) * torch.linspace(0, 1, 9)).sum().backward()
    (naive_token_logps(b, labels, 1.3) * torch.linspace(0, 1, 9)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    assert a.grad[2].abs().sum() == 0  # masked rows get no gradient
    half = logits.bfloat16()
    got = selective_log_softmax(half, labels, 5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_token_logps(half.float(), labels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.8, 1.0])  # 1.0: the in-place backward without a scaling pass
def test_gradcheck_chunked_autograd_functions(temperature):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 5), generator=gen)
    labels[1, 3:] = -100
    assert torch.autograd.gradcheck(lambda x: selective_log_softmax(x, labels, 3, temperature=temperature), (logits,))
    hidden = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: logps_from_hidden(h, w, labels, chunk_size=3, lm_head_bias=b, temperature=temperature),
        (hidden, weight, bias),
    )


def test_sequence_logps_shifts_and_masks(batch):
    logits, labels = batch
    mask = torch.ones_like(labels)
    mask[0, -1] = 0
    got = sequence_logps(logits, labels, mask, chunk_size=4)
    tok = naive_token_logps(logits[:, :-1], labels[:, 1:])
    eff = (labels[:, 1:] != -100) & mask[:, 1:].bool()
    want = (tok * eff).sum(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    avg = sequence_logps(logits, labels, mask, chunk_size=4, average=True)
    torch.testing.assert_close(avg, want / eff.sum(-1).clamp_min(1), atol=1e-5, rtol=1e-5)
    assert got[2].item() == 0.0 and avg[2].item() == 0.0


def test_logps_from_hidden_equals_full_head():
    gen = torch.Generator().manual_seed(2)
    B, T, H, V = 2, 7, 8, 13
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[1, 5:] = -100
    mask = torch.ones(B, T)
    mask[0, 0] = 0
    h1 = hidden.clone().requires_grad_()
    got = logps_from_hidden(h1[:, :-1], head.weight, labels[:, 1:], mask[:, 1:], chunk_size=3)
    got.sum().backward()
    g_w = head.weight.grad.clone()
    head.weight.grad = None
    h2 = hidden.clone().requires_grad_()
    full = naive_token_logps(head(h2)[:, :-1], labels[:, 1:].masked_fill(mask[:, 1:] == 0, -100))
    full.sum().backward()
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_w, head.weight.grad, atol=1e-5, rtol=1e-5)


def test_check_finite_names_step_and_quantity():
    check_finite("loss", torch.tensor([1.0, 2.0]), step=3)
    with pytest.raises(NonFiniteError, match=r"non-finite loss/policy at step 7: 1 of 3") as err:
        check_finite("loss/policy", torch.tensor([1.0, float("nan"), 0.0]), step=7)
    assert err.value.step == 7 and err.value.name == "loss/policy"
    with pytest.raises(NonFiniteError):
        check_finite("kl", torch.tensor(float("inf")), step=0)
