"""The Triton decode attention (alignment.triton_attention) against the torch decode attention, and
its fused form (rotary embedding + cache write + attention) against those three steps.

Where it runs: on a CUDA device the kernel itself (bf16, as the decode runs it); on CPU under
Triton's interpreter (``TRITON_INTERPRET=1``, fp32 and fp16: the interpreter's bf16 matmul is not
usable) in a child process, where Triton is installed. The CPU torch wheel has no Triton: there
only the fallback test runs, and the kernel is checked on the device (``pytest`` there and
``benchmarks/gpu_decode.py``'s checks, RESULTS.md run 26).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from alignment import triton_attention
from alignment.fast_generation import GraphDecoder, decode_attention, decode_attention_triton
from alignment.generation import KVDecoder
from tests.triton_interpreter import HAS_TRITON, run_in_interpreter

CUDA = torch.cuda.is_available() and HAS_TRITON
IDS = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
TOKENS = ([13, 14], [15, 16], [17, 18])


def cases(device, dtype):
    """(q, k, v, mask) with grouped heads (G = 7, 1, 4, 2), lengths not a multiple of the kernel's
    block, a row whose only valid slot is its last, and non-contiguous K/V."""
    gen = torch.Generator().manual_seed(0)
    for B, Hq, Hk, T, D in [(3, 14, 2, 70, 64), (2, 8, 8, 130, 32), (2, 4, 1, 64, 16)]:
        q = torch.randn(B, Hq, 1, D, generator=gen)
        k, v = torch.randn(B, Hk, T, D, generator=gen), torch.randn(B, Hk, T, D, generator=gen)
        valid = torch.rand(B, T, generator=gen) < 0.6
        valid[:, 5] = True
        valid[0] = False
        valid[0, -1] = True
        valid[1:, T // 2 :] = False  # slots not yet filled: whole blocks of the kernel's 64 unread
        valid[1:, T // 2 - 1] = True
        yield (*(x.to(device, dtype) for x in (q, k, v)), valid.to(device)[:, None, None, :])
    # strides as a transposed projection leaves them: heads and positions swapped in memory
    q = torch.randn(2, 1, 8, 32, generator=gen).transpose(1, 2)
    k, v = (torch.randn(2, 50, 4, 32, generator=gen).transpose(1, 2) for _ in "kv")
    valid = torch.rand(2, 50, generator=gen) < 0.5
    valid[:, -1] = True
    yield (*(x.to(device, dtype) for x in (q, k, v)), valid.to(device)[:, None, None, :])


def tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=40, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)  # head size 16: the kernel's smallest
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def tiny_wide(kind: str):
    """The tiny decoders with head size 32, the fused update's smallest (its halves feed matrix products)."""
    torch.manual_seed(0)
    common = dict(vocab_size=40, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def update_cases(device, dtype):
    """(q, k, v, cos, sin, key cache, value cache, slot, valid) before the step: grouped heads (G = 7,
    1, 2), contiguous and transposed-projection strides, one rotary table for the whole batch, and a
    row whose only valid slot is the new one."""
    gen = torch.Generator().manual_seed(1)
    for B, Hq, Hk, T, D, slot, shared_table in [(3, 14, 2, 70, 64, 41, False), (2, 8, 8, 130, 32, 129, True),
                                                 (2, 4, 2, 64, 128, 0, False)]:
        q = torch.randn(B, 1, Hq, D, generator=gen).transpose(1, 2)  # as the projection's split leaves it
        k, v = (torch.randn(B, 1, Hk, D, generator=gen).transpose(1, 2) for _ in "kv")
        angle = torch.rand(1 if shared_table else B, 1, D // 2, generator=gen) * 6
        cos, sin = torch.cat([angle.cos()] * 2, dim=-1), torch.cat([angle.sin()] * 2, dim=-1)
        kc, vc = torch.randn(B, Hk, T, D, generator=gen), torch.randn(B, Hk, T, D, generator=gen)
        valid = torch.rand(B, T, generator=gen) < 0.6
        valid[:, slot + 1:] = False  # slots after the new one are not filled yet
        valid[0] = False
        valid[:, slot] = True
        yield (*(x.to(device, dtype) for x in (q, k, v, cos, sin, kc, vc)), torch.tensor([slot], device=device),
               valid.to(device))


def check_update(device, dtype, atol):
    """The fused step against the rotary embedding, the cache's index_copy_ and the torch decode
    attention: the same attention and the same caches."""
    for q, k, v, cos, sin, kc, vc, slot, valid in update_cases(device, dtype):
        qr, kr = apply_rotary_pos_emb(q, k, cos.expand(q.shape[0], -1, -1), sin.expand(q.shape[0], -1, -1))
        want_k, want_v = kc.clone().index_copy_(2, slot, kr), vc.clone().index_copy_(2, slot, v.contiguous())
        want, _ = decode_attention(None, qr, want_k, want_v, valid[:, None, None, :], scaling=q.shape[-1] ** -0.5)
        got = triton_attention.rope_write_decode(q, k, v, cos, sin, kc, vc, slot, valid, q.shape[-1] ** -0.5)
        assert got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
        torch.testing.assert_close(kc.float(), want_k.float(), atol=atol, rtol=0)
        assert torch.equal(vc, want_v)


def check_update_decoder(kind, device, dtype, atol, use_graph=False, compile_step=False):
    """Decoding with the fused update gives the logits and caches of decoding without it."""
    model = tiny_wide(kind).to(device, dtype)
    options = dict(use_graph=use_graph, compile_step=compile_step, fuse_projections=True, triton_attention=True)
    plain, fused = GraphDecoder(model, **options), GraphDecoder(model, **options, fuse_cache_update=True)
    for got, want in zip(step_logits(fused, device), step_logits(plain, device), strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
    for got, want in zip(fused.cache.layers, plain.cache.layers, strict=True):
        torch.testing.assert_close(got.keys.float(), want.keys.float(), atol=atol, rtol=0)
        torch.testing.assert_close(got.values.float(), want.values.float(), atol=atol, rtol=0)
        # the fused steps wrote past the prefill without the cache's own counter
        assert int(got.cumulative_length) == IDS.shape[1] < int(want.cumulative_length)


def step_logits(decoder, device="cpu"):
    ids = IDS.to(device)
    with torch.no_grad():
        out = [decoder.prefill(ids, (ids != 0).long(), len(TOKENS))]
        out += [decoder.step(torch.tensor(t, device=device)) for t in TOKENS]
    return out


def check_kernel(device, dtype, atol):
    for q, k, v, mask in cases(device, dtype):
        want, _ = decode_attention(None, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
        got, none = decode_attention_triton(None, q, k, v, mask, scaling=q.shape[-1] ** -0.5)
        assert none is None and got.shape == want.shape == (q.shape[0], 1, q.shape[1], q.shape[-1])
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


def check_decoder(kind, device, dtype, atol):
    model = tiny(kind).to(device, dtype)
    plain = step_logits(KVDecoder(model), device)
    decoder = GraphDecoder(model, use_graph=False, triton_attention=True)
    assert decoder.attention == "alignflow_decode_triton"
    for got, want in zip(step_logits(decoder, device), plain, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)


def test_off_the_gpu_the_torch_attention_runs():
    """A CPU tensor (no interpreter) takes the torch path: the very same numbers; a decoder with the
    setting on decodes as the plain loop does."""
    for q, k, v, mask in cases("cpu", torch.float32):
        want, _ = decode_attention(None, q, k, v, mask)
        got, _ = decode_attention_triton(None, q, k, v, mask)
        assert torch.equal(got, want)
    assert not triton_attention.supports_update(torch.zeros(1, 4, 1, 32), torch.zeros(1, 2, 8, 32))
    model = tiny_wide("qwen2")  # the fused update asked for on CPU: the cache is written by its own update
    fused = GraphDecoder(model, fuse_projections=True, triton_attention=True, fuse_cache_update=True)
    for got, want in zip(step_logits(fused), step_logits(KVDecoder(model)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert int(fused.cache.layers[0].cumulative_length) == IDS.shape[1] + len(TOKENS)
    model = tiny("llama")
    for got, want in zip(step_logits(GraphDecoder(model, triton_attention=True)), step_logits(KVDecoder(model)),
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
def test_the_kernel_on_cuda_matches_the_torch_attention():
    check_kernel("cuda", torch.bfloat16, atol=2e-2)  # bf16 outputs of |x| < 4: a few units of the last place
    for kind in ("llama", "qwen2"):
        check_decoder(kind, "cuda", torch.float32, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
def test_the_fused_update_on_cuda_matches_the_three_steps_it_replaces():
    check_update("cuda", torch.bfloat16, atol=3e-2)
    check_update("cuda", torch.float32, atol=1e-4)
    for kind in ("llama", "qwen2"):
        check_update_decoder(kind, "cuda", torch.float32, atol=1e-4)
        # compiled and replayed as a CUDA graph: the kernel's cache writes land in the graph's cache
        check_update_decoder(kind, "cuda", torch.float32, atol=1e-4, use_graph=True, compile_step=True)


INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from alignment import triton_attention
    from tests.unit import test_triton_attention as t
    assert triton_attention.INTERPRETED
    t.check_kernel("cpu", torch.float32, atol=1e-5)
    t.check_kernel("cpu", torch.float16, atol=2e-3)
    for kind in ("llama", "qwen2"):
        t.check_decoder(kind, "cpu", torch.float32, atol=1e-5)
    t.check_update("cpu", torch.float32, atol=1e-5)
    t.check_update("cpu", torch.float16, atol=3e-3)
    for kind in ("llama", "qwen2"):
        t.check_update_decoder(kind, "cpu", torch.float32, atol=1e-5)
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (the CPU torch wheel has none)")
def test_the_kernel_under_the_interpreter_matches_the_torch_attention():
    run_in_interpreter(INTERPRETER_SCRIPT)
