"""Decode with fused projections (alignment.fused_decode) against the plain decode loop, on CPU.

The GPU decode captures these same forwards in a CUDA graph (benchmarks/gpu_decode.py checks the
graph's tokens on the device); here the static-cache step runs eagerly, in fp32, so fused and
plain logits agree to float rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from alignment.config import GenerationSettings
from alignment.fast_generation import GraphDecoder
from alignment.fused_decode import FusedDecodeWeights
from alignment.generation import KVDecoder, generate

IDS = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
TOKENS = ([13, 14], [15, 16], [17, 18])


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()  # q/k/v with biases, tied head


def step_logits(decoder, model, steps=TOKENS):
    mask = (IDS != 0).long()
    with torch.no_grad():
        out = [decoder.prefill(IDS, mask, len(steps))]
        out += [decoder.step(torch.tensor(t)) for t in steps]
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("compile_step", [False, True])
def test_fused_step_equals_the_plain_loop(kind, compile_step):
    model = tiny(kind)
    plain = step_logits(KVDecoder(model), model)
    decoder = GraphDecoder(model, compile_step=compile_step, fuse_projections=True)
    fused = step_logits(decoder, model)
    assert decoder.fused.fused_layers == model.config.num_hidden_layers
    for got, want in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    attention = model.model.layers[0].self_attn
    assert type(attention).__name__ == f"{'Llama' if kind == 'llama' else 'Qwen2'}Attention"  # restored
    assert "fused_qkv" not in attention.__dict__


def test_the_step_reads_the_fused_copies():
    """Changing the copies (not the model) changes the logits: the patched forwards are the ones used."""
    model = tiny("llama")
    decoder = GraphDecoder(model, fuse_projections=True)
    want = step_logits(decoder, model)[-1]
    decoder = GraphDecoder(model, fuse_projections=True)
    mask = (IDS != 0).long()
    with torch.no_grad():
        decoder.prefill(IDS, mask, len(TOKENS))
        for _, _, value, _ in decoder.fused.entries:
            first = value[0] if isinstance(value, tuple) else value
            first.mul_(1.5)
        for t in TOKENS:
            got = decoder.step(torch.tensor(t))
    assert (got - want).abs().max() > 1e-2


def test_unsupported_layers_decode_unchanged(folder):
    """GPT-2's fused c_attn is not a supported layer: nothing is patched, the step is the plain one."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    weights = FusedDecodeWeights.build(model, torch.float32)
    if model.config.model_type == "gpt2":
        assert weights.fused_layers == 0 and weights.entries == []
    plain = step_logits(KVDecoder(model), model)
    fused = step_logits(GraphDecoder(model, fuse_projections=True), model)
    torch.testing.assert_close(fused[-1], plain[-1], atol=1e-5, rtol=1e-5)


def test_copies_take_the_autocast_dtype():
    """Under bf16 autocast over fp32 weights (rollouts) every copy is bf16: no per-step weight cast."""
    model = tiny("qwen2")
    mask = (IDS != 0).long()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = GraphDecoder(model)
        fused = GraphDecoder(model, fuse_projections=True)
        a, b = plain.prefill(IDS, mask, 2), fused.prefill(IDS, mask, 2)
        a, b = plain.step(torch.tensor([13, 14])), fused.step(torch.tensor([13, 14]))
    tensors = [t for _, _, v, _ in fused.fused.entries for t in (v if isinstance(v, tuple) else (v,))
               if isinstance(t, torch.Tensor)]
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors)
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(b.float(), a.float(), atol=0.1, rtol=0.05)  # bf16 rounding of a different matmul


@pytest.mark.parametrize("do_sample", [True, False])
def test_generate_with_fused_projections_samples_the_same_tokens(tokenizer, tmp_path, do_sample):
    from tests.tiny_models import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m", "llama")).eval()
    prompts = ["the movie was", "a", "good good film and"]
    settings = GenerationSettings(max_new_tokens=8, do_sample=do_sample, batch_size=2)
    default = generate(model, tokenizer, prompts, settings, seed=5)
    fused = generate(model, tokenizer, prompts,
                     settings.model_copy(update={"cuda_graphs": True, "fuse_projections": True}), seed=5)
    assert torch.equal(fused.response_ids, default.response_ids)
    assert fused.texts == default.texts


def test_compiled_sampler_draws_the_eager_samplers_tokens():
    """The compiled race (CUDA rollouts with compile_step) = sample_next's eager draw from the same generator."""
    from alignment.generation import sample_next

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    settings = GenerationSettings(temperature=0.7)
    for seed in range(3):
        eager = sample_next(logits, settings, torch.Generator().manual_seed(seed))
        fused = sample_next(logits, settings, torch.Generator().manual_seed(seed), fused=True)
        assert torch.equal(fused, eager)
    assert not torch.equal(sample_next(logits, settings, torch.Generator().manual_seed(1), fused=True),
                           sample_next(logits, settings, torch.Generator().manual_seed(2), fused=True))
