"""The Triton decode attention (alignment.triton_attention) against the torch decode attention.

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
    model = tiny("llama")
    for got, want in zip(step_logits(GraphDecoder(model, triton_attention=True)), step_logits(KVDecoder(model)),
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
def test_the_kernel_on_cuda_matches_the_torch_attention():
    check_kernel("cuda", torch.bfloat16, atol=2e-2)  # bf16 outputs of |x| < 4: a few units of the last place
    for kind in ("llama", "qwen2"):
        check_decoder(kind, "cuda", torch.float32, atol=1e-4)


INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from alignment import triton_attention
    from tests.unit import test_triton_attention as t
    assert triton_attention.INTERPRETED
    t.check_kernel("cpu", torch.float32, atol=1e-5)
    t.check_kernel("cpu", torch.float16, atol=2e-3)
    for kind in ("llama", "qwen2"):
        t.check_decoder(kind, "cpu", torch.float32, atol=1e-5)
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (the CPU torch wheel has none)")
def test_the_kernel_under_the_interpreter_matches_the_torch_attention():
    run_in_interpreter(INTERPRETER_SCRIPT)
