"""The decoder layers as one persistent Triton kernel (alignment.triton_layers) against transformers' own
layers: the same logits at every decode step and the same cache.

Where it runs: on a CUDA device the persistent kernel itself (every stage in one launch, grid barriers
between them; fp32 and bf16, eager and captured in a CUDA graph); on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, fp32: each stage its own launch, the same code without the barrier) in a
child process, where Triton is installed. The CPU torch wheel has no Triton: there only the fallback
test runs.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from alignment import triton_layers
from alignment.fast_generation import GraphDecoder
from alignment.generation import KVDecoder
from tests.triton_interpreter import HAS_TRITON, run_in_interpreter

CUDA = torch.cuda.is_available() and HAS_TRITON
# left padding on two rows; more rows than a power of two
IDS = torch.tensor([[0, 0, 5, 6, 7, 3], [8, 9, 10, 11, 12, 13], [0, 14, 15, 16, 17, 18]])
TOKENS = ([19, 20, 21], [22, 23, 24], [25, 26, 27], [28, 29, 30])


def model(kind: str, wide: bool = False, act: str = "silu"):
    """Tiny decoders: head size 32; ``wide``: 14 query heads over 2 K/V heads (the 0.5B shape's
    grouping) and an MLP width off the kernel's tiles."""
    torch.manual_seed(0)
    heads, kv, inner = (14, 2, 96) if wide else (4, 2, 64)
    common = dict(vocab_size=40, hidden_size=32 * heads, intermediate_size=inner, num_hidden_layers=3,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                  hidden_act=act)
    if kind == "llama":
        built = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    else:
        built = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong one shows
        for name, p in built.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return built.eval()


def step_logits(decoder, device="cpu"):
    ids = IDS.to(device)
    with torch.no_grad():
        out = [decoder.prefill(ids, (ids != 0).long(), len(TOKENS))]
        out += [decoder.step(torch.tensor(t, device=device)) for t in TOKENS]
    return out


def check(kind, device, dtype, atol, wide=False, use_graph=False, tiles=None):
    """Decoding with the kernel gives the logits and caches of transformers' layers (the KV loop)."""
    net = model(kind, wide).to(device, dtype)
    kernel = GraphDecoder(net, use_graph=use_graph, triton_layers=True, layer_tiles=tiles)
    got = step_logits(kernel, device)
    assert kernel.layers is not None, "the kernel did not run"
    reference = GraphDecoder(net, use_graph=False)
    want = step_logits(reference, device)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)
    for a, b in zip(kernel.cache.layers, reference.cache.layers, strict=True):
        torch.testing.assert_close(a.keys.float(), b.keys.float(), atol=atol, rtol=0)
        torch.testing.assert_close(a.values.float(), b.values.float(), atol=atol, rtol=0)
    assert not kernel.layers.failed


def test_where_the_kernel_does_not_run_the_decoder_says_why_and_decodes_as_before():
    """Off the GPU (no interpreter) the kernel is not used: the other settings decode, the same logits."""
    net = model("qwen2")
    reason = triton_layers.unsupported_reason(net, 3, torch.device("cpu"))
    assert reason in ("Triton is not installed", "not a CUDA device")
    assert triton_layers.unsupported_reason(net, 65, torch.device("cuda")) == "batch 65 > 64"
    assert "activation" in triton_layers.unsupported_reason(model("llama", act="gelu"), 3, torch.device("cuda"))
    decoder = GraphDecoder(net, triton_layers=True, fuse_projections=True)
    for a, b in zip(step_logits(decoder), step_logits(KVDecoder(net)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert decoder.layers is None and decoder.fused is not None


def test_a_lora_projection_is_refused_by_name():
    peft = pytest.importorskip("peft")
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    net = get_peft_model(model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "LoRA" in triton_layers.unsupported_reason(net, 3, torch.device("cuda"))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
def test_the_persistent_kernel_on_cuda_matches_the_layers():
    for kind in ("qwen2", "llama"):
        check(kind, "cuda", torch.bfloat16, atol=6e-2, wide=True)  # bf16 logits of |x| < 4
        check(kind, "cuda", torch.float32, atol=2e-4, wide=True)
        check(kind, "cuda", torch.float32, atol=2e-4, wide=True, use_graph=True)  # captured and replayed
        check(kind, "cuda", torch.float32, atol=2e-4, wide=True, tiles={"SPLIT": 1, "BN_DOWN": 16})
        check(kind, "cuda", torch.float32, atol=2e-4, wide=True, tiles={"num_warps": 8, "BK": 128})
        check(kind, "cuda", torch.float32, atol=2e-4)


INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from alignment import triton_layers
    from tests.unit import test_triton_layers as t
    assert triton_layers.INTERPRETED
    for kind in ("llama", "qwen2"):
        t.check(kind, "cpu", torch.float32, atol=1e-4)
        t.check(kind, "cpu", torch.float32, atol=1e-4, wide=True)
        t.check(kind, "cpu", torch.float32, atol=1e-4, wide=True, tiles={"SPLIT": 1, "BN_DOWN": 16})
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (the CPU torch wheel has none)")
def test_the_kernel_under_the_interpreter_matches_the_layers():
    run_in_interpreter(INTERPRETER_SCRIPT, timeout=900)
