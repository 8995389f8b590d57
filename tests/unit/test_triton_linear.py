"""The decode projections as Triton kernels (alignment.triton_linear) against ``F.linear`` and the
MLP's ``silu(gate) * up``, and decoders using them against decoders without them.

Where it runs: on a CUDA device the kernel itself (bf16, the autotuned configs and fixed ones, eager
and compiled + replayed as a CUDA graph); on CPU under Triton's interpreter (fp32 and fp16) in a
child process, where Triton is installed. The CPU torch wheel has no Triton: there only the
fallback test runs.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from alignment import triton_linear
from alignment.fast_generation import GraphDecoder
from tests.triton_interpreter import HAS_TRITON, run_in_interpreter
from tests.unit.test_triton_attention import step_logits, tiny_wide

CUDA = torch.cuda.is_available() and HAS_TRITON


def linear_cases(device, dtype):
    """(x, weight, bias, gated): rows under, at and over a 64-row tile, sizes not a multiple of any
    block, a bias, the gated form, a strided ``x`` and a leading batch shape."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.25).to(device, dtype)

    yield r(5, 100), r(70, 100), r(70), False
    yield r(64, 300), r(96, 300), None, False
    yield r(70, 64), r(40, 64), None, False  # two row tiles
    yield r(3, 50), r(2 * 40, 50), None, True  # gate/up: [gate; up], 40 outputs
    yield r(64, 90)[:, ::2], r(2 * 33, 45), None, True  # x strided along K
    yield r(4, 1, 48), r(24, 48), r(24), False  # [B, 1, K] as the decode step has it


def reference(x, weight, bias, gated):
    if not gated:
        return F.linear(x, weight, bias)
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    return F.silu(gate) * up


def check_linear(device, dtype, atol, configs=(None,), rtol=0.0):
    """Every case under every config: the reference's values, deterministic bits, counters back at zero."""
    count = triton_linear.counters(device)
    for config in configs:
        for x, weight, bias, gated in linear_cases(device, dtype):
            got = triton_linear.linear(x, weight, bias, count, gated=gated, config=config)
            want = reference(x, weight, bias, gated)
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
            again = triton_linear.linear(x, weight, bias, count, gated=gated, config=config)
            assert torch.equal(got, again)
            assert int(count.abs().sum()) == 0, "a launch left a split-K counter set"


def check_decoder(kind, device, dtype, atol, use_graph=False, compile_step=False, triton_attention=False):
    """Decoding with the projections as Triton kernels gives the logits of decoding without them."""
    model = tiny_wide(kind).to(device, dtype)
    options = dict(use_graph=use_graph, compile_step=compile_step, fuse_projections=True,
                   triton_attention=triton_attention, fuse_cache_update=triton_attention)
    plain, fast = GraphDecoder(model, **options), GraphDecoder(model, **options, triton_matmul=True)
    for got, want in zip(step_logits(fast, device), step_logits(plain, device), strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
    assert fast.fused.counters is not None and int(fast.fused.counters.abs().sum()) == 0


def test_off_the_gpu_the_projections_run_as_before():
    """CPU without the interpreter (CI): the Triton matmul asked for falls back to F.linear."""
    model = tiny_wide("qwen2")
    plain, fast = GraphDecoder(model, fuse_projections=True), GraphDecoder(model, fuse_projections=True,
                                                                           triton_matmul=True)
    for got, want in zip(step_logits(fast), step_logits(plain), strict=True):
        assert torch.equal(got, want)
    if not triton_linear.INTERPRETED:
        assert fast.fused.counters is None
    assert not triton_linear.supported(torch.zeros(triton_linear.MAX_ROWS + 1, 8), torch.zeros(4, 8))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
def test_the_kernel_on_cuda_matches_f_linear():
    # bf16: one rounding each side, summed in another order: a unit of the last place (2^-7 relative) apart
    check_linear("cuda", torch.bfloat16, atol=3e-2, rtol=1.6e-2,
                 configs=[None, (32, 128, 1, 4, 4), (64, 64, 16, 4, 4), (128, 64, 4, 4, 4)])
    check_linear("cuda", torch.float32, atol=1e-4, configs=[None, (32, 32, 3, 4, 2)])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
def test_decoders_on_cuda_with_the_kernel_match_decoders_without():
    for kind in ("llama", "qwen2"):
        check_decoder(kind, "cuda", torch.float32, atol=1e-4)
        check_decoder(kind, "cuda", torch.float32, atol=1e-4, use_graph=True, compile_step=True, triton_attention=True)


INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from alignment import triton_linear
    from tests.unit import test_triton_linear as t
    assert triton_linear.INTERPRETED
    t.check_linear("cpu", torch.float32, atol=1e-5, configs=[None, (16, 16, 1, 4, 1), (32, 32, 8, 4, 1)])
    t.check_linear("cpu", torch.float16, atol=3e-3)
    for kind in ("llama", "qwen2"):
        t.check_decoder(kind, "cpu", torch.float32, atol=1e-5)
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (the CPU torch wheel has none)")
def test_the_kernel_under_the_interpreter_matches_f_linear():
    run_in_interpreter(INTERPRETER_SCRIPT)
