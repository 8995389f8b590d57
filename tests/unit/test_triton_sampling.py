"""The Triton Gumbel-max sampler (alignment.triton_sampling): its draws against softmax(logits / T).

Where it runs: on a CUDA device the kernels themselves (bf16 and fp32, a CUDA graph, a whole
compiled decode); on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, fp32 and fp16) in a
child process, where Triton is installed. The interpreter runs a few milliseconds per program, so
its checks are small (under 2,000 programs: about 20 s on two cores). The CPU torch wheel has no
Triton: there only the fallback test runs (the CPU draw is unchanged), and the kernels are checked
on the device (``pytest`` there and ``benchmarks/gpu_decode.py``'s frequency check).
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from alignment import triton_sampling
from tests.triton_interpreter import HAS_TRITON, run_in_interpreter

CUDA = torch.cuda.is_available() and HAS_TRITON


def chi_square_ok(tokens: torch.Tensor, probs: torch.Tensor, alpha_z: float = 3.09) -> tuple[bool, float, float]:
    """Pearson's chi-square of the drawn ``tokens`` against ``probs`` (float64), bins of expected
    count under 5 merged into one; ``(statistic <= the 1 - 1e-3 quantile, statistic, quantile)``.
    The quantile is Wilson–Hilferty's (z = 3.09 for 1e-3), which is within 1% here."""
    n = len(tokens)
    counts = torch.bincount(tokens.cpu(), minlength=len(probs)).double()
    expected = probs.double() * n
    assert counts[expected == 0].sum() == 0, "a token of probability 0 was drawn"
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (expected > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (expected > 0)].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    k = len(exp) - 1
    quantile = k * (1 - 2 / (9 * k) + alpha_z * math.sqrt(2 / (9 * k))) ** 3
    return stat <= quantile, stat, quantile


def frequency_row(V: int, seed: int = 0) -> torch.Tensor:
    """A float64 logits row with a spread of probabilities and one -inf (token 5)."""
    row = torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5
    row[5] = float("-inf")
    return row


def check_frequencies(device, dtype, block, V, draws, temperature=0.7):
    """(a) Each row of ``draws`` copies of one logits row is one draw: token frequencies match
    softmax(row / T) (chi-square, 1e-3 level; the seed is fixed, so the check is deterministic);
    the -inf token is never drawn; every token lies in [0, V)."""
    row = frequency_row(V)
    rounded = row.to(dtype).double()  # the distribution of the logits as the kernel reads them
    probs = torch.softmax(rounded / temperature, dim=0)
    state = triton_sampling.new_state(device, torch.Generator(device=device).manual_seed(0))
    tokens = triton_sampling.gumbel_sample(row.to(device, dtype).repeat(draws, 1), state, temperature, block=block)
    assert tokens.dtype == torch.int64 and tokens.shape == (draws,) and tokens.device.type == torch.device(device).type
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V
    assert not bool((tokens == 5).any())
    ok, stat, quantile = chi_square_ok(tokens, probs)
    assert ok, f"chi-square {stat:.1f} above the 1e-3 quantile {quantile:.1f} ({dtype}, block {block})"
    assert int(state[1]) == draws


def extreme_rows(V: int, dtype) -> tuple[torch.Tensor, list[int]]:
    """Rows with one right answer each: (logits [R, V] as fp32, the token each must give)."""
    gen = torch.Generator().manual_seed(1)
    low = -3e4 if dtype == torch.float16 else -1e30  # very negative, finite in the dtype
    rows, want = [], []
    for pos in (0, 3, 15, 16, 17, V // 2, V - 1):  # one logit far above the rest, in each block
        r = torch.randn(V, generator=gen)
        r[pos] = 40.0
        rows.append(r)
        want.append(pos)
    for pos in (0, 16, V - 1):  # a single finite logit, very negative, among -inf
        r = torch.full((V,), float("-inf"))
        r[pos] = low
        rows.append(r)
        want.append(pos)
    r = torch.full((V,), float("-inf"))  # NaN never wins: the one finite logit does
    r[::3] = float("nan")
    r[V - 2] = low
    rows.append(r)
    want.append(V - 2)
    for tied in ((3, 20, 33), (17, V - 1), (V - 4, V - 3)):  # +inf ties: the lowest index, across blocks
        r = torch.randn(V, generator=gen)
        r[list(tied)] = float("inf")
        rows.append(r)
        want.append(tied[0])
    rows.append(torch.full((V,), float("-inf")))  # nothing above -inf: token 0
    want.append(0)
    r = torch.full((V,), float("nan"))
    rows.append(r)
    want.append(0)
    return torch.stack(rows), want


def check_extremes(device, dtype, block, V, repeats=1):
    """(b) A logit far above the rest always wins; -inf never wins, even when the only other logit
    is very negative; NaN never wins; +inf ties go to the lowest index; (d) tokens in [0, V)."""
    logits, want = extreme_rows(V, dtype)
    logits = logits.repeat(repeats, 1)
    state = triton_sampling.new_state(device, torch.Generator(device=device).manual_seed(2))
    for temperature in (1.0, 0.25):
        tokens = triton_sampling.gumbel_sample(logits.to(device, dtype), state, temperature, block=block).cpu()
        assert tokens.tolist() == want * repeats, (temperature, dtype, block)
    # half the vocabulary suppressed and the rest very negative: only finite logits are drawn
    gen = torch.Generator().manual_seed(3)
    neg = -60000.0 if dtype == torch.float16 else -1e4
    many = neg + torch.randn(48, V, generator=gen)
    many[torch.rand(48, V, generator=gen) < 0.5] = float("-inf")
    many[:, 7] = neg  # every row keeps a finite logit
    tokens = triton_sampling.gumbel_sample(many.to(device, dtype), state, 1.0, block=block).cpu()
    assert int(tokens.min()) >= 0 and int(tokens.max()) < V
    assert bool(many.gather(1, tokens[:, None]).isfinite().all())


def check_seeds(device, dtype, block, V, rows=32):
    """(c) The same generator seed gives the same state and tokens, draw after draw; each draw
    advances the counter by B and draws other tokens; another seed draws other tokens; the
    sampler class draws what the function does."""
    logits = torch.zeros(rows, V).to(device, dtype)  # uniform: every token equally likely

    def draws(seed, n=2):
        state = triton_sampling.new_state(device, torch.Generator(device=device).manual_seed(seed))
        out = [triton_sampling.gumbel_sample(logits, state, 1.0, block=block).cpu() for _ in range(n)]
        return out, state.cpu()

    (a1, a2), sa = draws(0)
    (b1, b2), sb = draws(0)
    (c1, _), sc = draws(1)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(sa, sb)
    assert int(sa[1]) == 2 * rows and int(sa[0]) != int(sc[0])
    assert not torch.equal(a1, a2) and not torch.equal(a1, c1)
    assert int(a1.min()) >= 0 and int(a1.max()) < V
    sampler = triton_sampling.GumbelSampler(device, torch.Generator(device=device).manual_seed(0), block=block)
    assert torch.equal(sampler(logits, 1.0).cpu(), a1) and torch.equal(sampler(logits, 1.0).cpu(), a2)
    with pytest.raises(ValueError):
        triton_sampling.gumbel_sample(logits, sampler.state, 0.0, block=block)
    with pytest.raises(ValueError):
        triton_sampling.gumbel_sample(logits, sampler.state, 1.0, block=24)


def check_graph(dtype, B=64, V=151936):
    """CUDA graphs: draws captured once and replayed give the tokens of as many eager draws from
    the same seed (the counter lives on the device and advances in the graph)."""
    device = "cuda"
    logits = torch.randn(B, V, device=device, generator=torch.Generator(device=device).manual_seed(4)).to(dtype)
    warm = triton_sampling.new_state(device)
    triton_sampling.gumbel_sample(logits, warm, 1.0)  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    state = triton_sampling.new_state(device, torch.Generator(device=device).manual_seed(5))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_sampling.gumbel_sample(logits, state, 0.8)
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(out.clone())
    again = triton_sampling.new_state(device, torch.Generator(device=device).manual_seed(5))
    eager = [triton_sampling.gumbel_sample(logits, again, 0.8) for _ in range(3)]
    for got, want in zip(replayed, eager, strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(replayed[0], replayed[1])
    assert torch.equal(state, again) and int(state[1]) == 3 * B


def test_without_triton_the_cpu_draw_is_unchanged(monkeypatch):
    """Off the GPU (no interpreter) the sampler is not used: sample_next(fused=True) with a sampler
    draws exactly the eager tokens from the same generator, and gumbel_sample refuses CPU logits.
    (The race is run uncompiled here: test_fused_decode checks that compiling it keeps the tokens.)"""
    from alignment import generation
    from alignment.config import GenerationSettings
    from alignment.generation import sample_next

    monkeypatch.setattr(generation, "_compiled_race", lambda: generation._tempered_race)
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    settings = GenerationSettings(temperature=0.7)
    assert not triton_sampling.supported(logits) or triton_sampling.INTERPRETED
    sampler = triton_sampling.GumbelSampler("cpu", torch.Generator().manual_seed(9))
    assert sampler.state.shape == (2,) and int(sampler.state[1]) == 0
    eager = sample_next(logits, settings, torch.Generator().manual_seed(1))
    fused = sample_next(logits, settings, torch.Generator().manual_seed(1), fused=True, sampler=sampler)
    assert torch.equal(fused, eager)
    assert int(sampler.state[1]) == 0  # not drawn from
    with pytest.raises(RuntimeError if not triton_sampling.AVAILABLE else ValueError):
        triton_sampling.gumbel_sample(logits, sampler.state, 1.0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
def test_the_kernels_on_cuda():
    for dtype in (torch.bfloat16, torch.float32):
        check_frequencies("cuda", dtype, block=16, V=37, draws=60000)
        check_frequencies("cuda", dtype, block=256, V=1000, draws=60000)
        check_frequencies("cuda", dtype, block=triton_sampling.BLOCK, V=1000, draws=60000)
        check_extremes("cuda", dtype, block=16, V=37, repeats=4)
        check_extremes("cuda", dtype, block=triton_sampling.BLOCK, V=151936)
        check_seeds("cuda", dtype, block=triton_sampling.BLOCK, V=151936)
        check_graph(dtype)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device with Triton")
def test_a_compiled_cuda_decode_samples_through_the_kernel(tmp_path, monkeypatch):
    """generate() with cuda_graphs + compile_step draws through the Triton sampler: the same seed
    gives the same responses, another seed others; top-k still takes the race."""
    from transformers import AutoModelForCausalLM

    from alignment.config import GenerationSettings
    from alignment.generation import generate
    from tests.tiny_models import make_tiny_model, make_tokenizer

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m", "llama")).eval().cuda()
    tokenizer = make_tokenizer()
    prompts = ["the movie was", "a", "good good film and"]
    settings = GenerationSettings(max_new_tokens=12, batch_size=3, cuda_graphs=True, compile_step=True)
    calls = []
    original = triton_sampling.gumbel_sample

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_sampling, "gumbel_sample", counting)
    a = generate(model, tokenizer, prompts, settings, seed=3)
    b = generate(model, tokenizer, prompts, settings, seed=3)
    c = generate(model, tokenizer, prompts, settings, seed=4)
    assert calls  # the eager first and last draws of each batch
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    assert int(a.response_ids.max()) < model.config.vocab_size


INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from alignment import triton_sampling
    from tests.unit import test_triton_sampling as t
    assert triton_sampling.INTERPRETED
    t.check_frequencies("cpu", torch.float32, block=16, V=37, draws=480)  # 3 blocks: 1,440 programs
    t.check_extremes("cpu", torch.float16, block=16, V=37)
    t.check_seeds("cpu", torch.float32, block=16, V=37, rows=8)
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed (the CPU torch wheel has none)")
def test_the_kernels_under_the_interpreter():
    run_in_interpreter(INTERPRETER_SCRIPT)
