"""Our KV-cache decode loop against ``model.generate`` on tiny GPT-2 and Llama models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.batching import encode_prompt
from alignment.config import GenerationSettings
from alignment.generation import generate, left_pad, race_noise, sample_next
from tests.tiny_models import make_tiny_model, make_tokenizer

PROMPTS = [
    "the movie was",
    "review the film and the plot of this very long story with many actors",
    "a",
    [{"role": "user", "content": "tell me about the music"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def hf_greedy(model, tokenizer, prompts, n, eos):
    """model.generate on the same left-padded batch, cut after the first EOS."""
    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                         eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def ours_rows(res):
    return [r[m.bool()].tolist() for r, m in zip(res.response_ids, res.response_mask, strict=True)]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_equals_model_generate(model, tokenizer, cache):
    settings = GenerationSettings(max_new_tokens=12, do_sample=False, batch_size=3)
    res = generate(model, tokenizer, PROMPTS, settings, seed=0, cache=cache)
    want = hf_greedy(model, tokenizer, PROMPTS, 12, [tokenizer.eos_token_id])
    assert ours_rows(res) == want
    assert res.response_ids.shape == (4, 12) and res.prompt_ids.shape[0] == 4
    # Prompts are left-padded: every row's last prompt column is a real token.
    assert res.prompt_mask[:, -1].all()
    assert res.texts[0] == tokenizer.decode(want[0], skip_special_tokens=True)


def test_greedy_equals_model_generate_without_padding(model, tokenizer):
    same_length = ["the movie was good", "a film is bad", "the story was dull"]
    assert len({len(encode_prompt(tokenizer, p)) for p in same_length}) == 1
    settings = GenerationSettings(max_new_tokens=10, do_sample=False)
    res = generate(model, tokenizer, same_length, settings, seed=0)
    assert ours_rows(res) == hf_greedy(model, tokenizer, same_length, 10, [tokenizer.eos_token_id])


def test_hf_backend_matches_and_samples_reproducibly(model, tokenizer):
    greedy = GenerationSettings(max_new_tokens=6, do_sample=False, batch_size=4)
    ours = generate(model, tokenizer, PROMPTS, greedy, seed=0)
    ref = generate(model, tokenizer, PROMPTS, greedy, seed=0, backend="hf")
    assert ours_rows(ref) == ours_rows(ours) and torch.equal(ref.hit_eos, ours.hit_eos)
    sampled = GenerationSettings(max_new_tokens=6, top_k=20, batch_size=4)
    a = generate(model, tokenizer, PROMPTS, sampled, seed=3, backend="hf")
    b = generate(model, tokenizer, PROMPTS, sampled, seed=3, backend="hf")
    assert torch.equal(a.response_ids, b.response_ids)


def test_eos_stops_rows_and_pads_after(model, tokenizer):
    settings = GenerationSettings(max_new_tokens=10, do_sample=False, batch_size=8)
    free = generate(model, tokenizer, PROMPTS, settings, seed=0)
    row0 = free.response_ids[0].tolist()
    # Treat the first token of row 0 that did not occur before as EOS: row 0 stops right there.
    j = next((j for j in range(1, len(row0)) if row0[j] not in row0[:j]), 0)
    stop = row0[j]
    res = generate(model, tokenizer, PROMPTS, settings, seed=0, eos_token_ids=[stop])
    assert ours_rows(res) == hf_greedy(model, tokenizer, PROMPTS, 10, [stop])
    assert res.hit_eos[0] and res.response_lengths[0] == j + 1
    assert res.response_mask[0].tolist()[: j + 2] == [1] * (j + 1) + [0]
    assert (res.response_ids[0, j + 1 :] == tokenizer.pad_token_id).all()
    for row, m, hit in zip(res.response_ids, res.response_mask, res.hit_eos, strict=True):
        n = int(m.sum())
        assert bool(hit) == (row[n - 1].item() == stop)
        assert stop not in row[: n - 1].tolist()  # no EOS before the end


def test_sampling_reproducible_and_seed_dependent(model, tokenizer):
    settings = GenerationSettings(max_new_tokens=8, temperature=1.5, top_k=50, top_p=0.95, batch_size=2)
    a = generate(model, tokenizer, PROMPTS * 2, settings, seed=7)
    b = generate(model, tokenizer, PROMPTS * 2, settings, seed=7)
    c = generate(model, tokenizer, PROMPTS * 2, settings, seed=8)
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)
    ids, mask = a.sequences()
    assert ids.shape == (8, a.prompt_ids.shape[1] + a.response_ids.shape[1])
    assert torch.equal(mask[:, a.prompt_ids.shape[1]:], a.response_mask)


def test_sample_next_truncation_and_frequencies():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    gen = torch.Generator().manual_seed(0)
    draw = sample_next(logits, GenerationSettings(top_k=2), gen)
    freq = torch.bincount(draw, minlength=4).float() / len(draw)
    assert freq[2:].sum() == 0
    assert freq[0].item() == pytest.approx(0.5 / 0.8, abs=0.015)
    # top_p = 0.7: 0.5 then 0.3 reaches 0.8 >= 0.7, so tokens 0 and 1 survive.
    draw_p = sample_next(logits, GenerationSettings(top_p=0.7), gen)
    assert set(draw_p.tolist()) == {0, 1}
    # temperature 0.5 squares the odds: p ~ [0.25, 0.09, 0.0225, 0.0025] / 0.365
    draw_t = sample_next(logits, GenerationSettings(temperature=0.5), gen)
    freq_t = torch.bincount(draw_t, minlength=4).float() / len(draw_t)
    assert freq_t[0].item() == pytest.approx(0.25 / 0.365, abs=0.015)
    assert sample_next(logits[:2], GenerationSettings(do_sample=False), gen).tolist() == [0, 0]


def _truncated_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The distribution sample_next should draw from, computed independently in float64."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")[: top_k or len(z)]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    keep = (np.cumsum(p) - p) < top_p
    out = np.zeros_like(z)
    out[order[keep]] = p[keep] / p[keep].sum()
    return out


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (10, 1.0), (0, 0.8), (10, 0.8), (60, 0.95)])
def test_sampler_draws_the_truncated_distribution(top_k, top_p):
    """Top-k races over its k candidates only: the draw's frequencies still match the renormalised
    distribution token by token, and no token outside it is ever drawn."""
    row = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    expected = _truncated_probs(row.numpy(), 0.8, top_k, top_p)
    n = 60000
    draw = sample_next(row.float().repeat(n, 1), GenerationSettings(temperature=0.8, top_k=top_k, top_p=top_p),
                       torch.Generator().manual_seed(0))
    freq = torch.bincount(draw, minlength=50).double().numpy() / n
    assert freq[expected == 0].sum() == 0
    assert np.abs(freq - expected).max() < 4 * np.sqrt(expected.max() / n) + 1e-3


def test_race_noise_is_exponential_and_never_zero():
    e = race_noise((400, 1000), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert e.dtype == torch.float32 and bool((e > 0).all())
    assert e.mean().item() == pytest.approx(1.0, abs=0.01)
    assert (e > 1).double().mean().item() == pytest.approx(np.exp(-1), abs=0.005)
    assert (e > 3).double().mean().item() == pytest.approx(np.exp(-3), abs=0.002)
    again = race_noise((400, 1000), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(e, again)


def test_prompt_encoding_and_errors(tokenizer, model):
    chat = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.endswith("assistant : ")
    assert encode_prompt(tokenizer, chat) == tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.raises(TypeError, match="prompt 1"):
        generate(model, tokenizer, ["ok", 5], GenerationSettings(), seed=0)
    # Truncation keeps the end of the prompt.
    res = generate(model, tokenizer, ["the movie was great and the music"], GenerationSettings(max_new_tokens=2),
                   seed=0, max_prompt_length=3)
    full = encode_prompt(tokenizer, "the movie was great and the music")
    assert len(full) == 7
    assert res.prompt_ids[0].tolist() == full[-3:]
    # ... and a leading BOS, as the trainers' truncation does.
    res = generate(model, tokenizer, ["<bos> the movie was great and the music"], GenerationSettings(max_new_tokens=2),
                   seed=0, max_prompt_length=3)
    assert res.prompt_ids[0].tolist() == [tokenizer.bos_token_id] + full[-2:]


def test_suppressed_tokens_are_never_sampled(model, tokenizer):
    allowed = {tokenizer.convert_tokens_to_ids(w) for w in ("good", "bad", "movie")} | {tokenizer.eos_token_id}
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i not in allowed]
    try:
        res = generate(model, tokenizer, ["the movie was"] * 8, GenerationSettings(max_new_tokens=6), seed=3)
    finally:
        model.generation_config.suppress_tokens = None
    emitted = set(res.response_ids[res.response_mask.bool()].tolist())
    assert emitted and emitted <= allowed
