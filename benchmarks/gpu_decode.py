"""Batched decode against the memory-bandwidth bound (issue 16, point 4), on one GPU.

For each shape (random bf16 weights, built like ``gpu_bench.py`` builds them): batch 64 × 128-token
prompts × 256 new tokens, sampling at T = 1 with EOS off, so every run decodes every step. Paths:

- ``model.generate``: transformers' own loop (the first run pays one-time costs; its best run is reported);
- ``step_graph``: our static cache + CUDA graph of the compiled forward, sampling outside the graph
  (the path of RESULTS run 8, kept here as the baseline);
- ``advance_graph``: the token choice captured with the forward (one graph launch per token);
- ``advance_sampler``: the same with the sampler's arithmetic compiled (``compile_step`` in the settings);
- ``advance_fused``: the same with ``fuse_projections`` (q/k/v and gate/up as one matmul each);
- ``advance_triton``: the same with ``triton_attention`` (each step's attention as one Triton kernel);
- ``advance_triton_sampler``: ``advance_triton`` with the token drawn by the Triton Gumbel-max sampler
  (:mod:`alignment.triton_sampling`) instead of the compiled exponential race (the other paths keep the race);
- ``advance_triton_update``: ``advance_triton_sampler`` with each layer's rotary embedding and cache write folded
  into the attention kernel (``fuse_cache_update``: :func:`alignment.triton_attention.rope_write_decode`).

ms/step (whole call) = wall time of the whole decode call (prefill, the eager first step and the
graph capture included) / 256, best of ``--reps``. ms/step (steady state) = (best 256-token call −
best 32-token call) / 224: what one more token costs once the batch is prefilled and its graph
captured (the per-call rest is printed as "fixed ms per call").
Bound of one step = (bf16 weight bytes + the KV cache at the average length, batch × (P + N/2)
tokens × 2 (K, V) × layers × kv_heads × head_dim × 2 bytes) / the copy bandwidth measured in the same
process (a device-to-device copy of 1 GiB, median of 10). Fraction of the bound = bound / ms per step.

Checks printed with the figures: ``advance_graph`` samples the very tokens ``step_graph`` samples (the
seeded generator registered with the graph advances as in eager decoding); greedy tokens of
``advance_fused`` and of ``advance_triton`` against ``step_graph``, and of ``advance_triton_update`` against
``advance_triton`` (bf16: they may part after a rounding tie, so the share of equal tokens up to each row's
first difference is reported); the Triton attention
kernel against the torch one on the decode's own shapes (largest absolute difference, bf16); the Triton
sampler's token frequencies over 2,048 draws of one fixed bf16 logits row at the decode's own [B, V] (16 heavy
tokens spread over the vocabulary; largest |frequency − softmax| against 4 standard errors of the likeliest
token), with the time of one draw by it and by the compiled race (CUDA events, mean of 200). Also the
graph's kernels per step.

    python3 benchmarks/gpu_decode.py --shapes qwen0.5b,llama1b --out $OUT
    python3 benchmarks/gpu_decode.py --no-checks --gen-reps 0 --paths advance_triton_sampler,advance_triton_update --out $OUT
    .venv/bin/python benchmarks/gpu_decode.py --device cpu --shapes tiny --new-tokens 8 --batch 4   # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.config import GenerationSettings  # noqa: E402
from alignment.fast_generation import GraphDecoder  # noqa: E402
from alignment.generation import _decode_batch, left_pad  # noqa: E402
from benchmarks.gpu_bench import (  # noqa: E402
    SHAPES,
    build_shape,
    copy_tbps,
    decode_step_bytes,
    sync,
    tokenizer_dir,
    words,
)

PATHS = ("step_graph", "advance_graph", "advance_sampler", "advance_fused", "advance_triton", "advance_triton_sampler",
         "advance_triton_update")


class StepGraphDecoder(GraphDecoder):
    """The decoder with sampling outside the graph (``_decode_batch`` then calls ``step``)."""

    advance = None


def decode(model, ids, settings, decoder_cls, seed=0, fuse=False, compile_step=True, triton_sampler=False):
    """``fuse``: False, True (fused projections), "triton" (fused projections and the Triton attention) or
    "update" ("triton" with the rotary embedding and cache write in the attention kernel);
    ``triton_sampler``: the compiled path's draw by the Triton sampler instead of the compiled race."""
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    dec = decoder_cls(model, compile_step=compile_step, fuse_projections=bool(fuse),
                      triton_attention=fuse in ("triton", "update"), fuse_cache_update=fuse == "update")
    eos = torch.tensor([-1], device=ids.device)
    out, _, _ = _decode_batch(dec, ids, torch.ones_like(ids), settings, gen, eos, pad_id=0,
                              triton_sampler=triton_sampler)
    return out, dec


def kernels_per_step(model, ids, settings, cls, fuse, triton_sampler=False) -> dict:
    """Kernels and GPU time per decode step: a 40-token decode's profile minus an 8-token one's
    (the same prefill, eager and capture steps), over the 32 steps between."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(n):
        s = settings.model_copy(update={"max_new_tokens": n})
        decode(model, ids, s, cls, fuse=fuse, triton_sampler=triton_sampler)  # warm
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode(model, ids, s, cls, fuse=fuse, triton_sampler=triton_sampler)
            torch.cuda.synchronize()
        return {e.key: (e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0}

    long, short = kernels(40), kernels(8)
    diff = {k: (c - short.get(k, (0, 0))[0], t - short.get(k, (0, 0))[1]) for k, (c, t) in long.items()}
    rows = sorted(diff.items(), key=lambda kv: -kv[1][1])
    return {"kernels_per_step": sum(c for c, _ in diff.values()) / 32,
            "gpu_ms_per_step": sum(t for _, t in diff.values()) / 32 / 1000,
            "top": [(k[:70], round(c / 32, 1), round(t / 32, 1)) for k, (c, t) in rows[:14]]}


def attention_check(model, B: int, T: int, device) -> float | None:
    """Largest |Triton − torch| of one decode attention on the model's head shapes (random bf16
    q/K/V, a random validity mask with each row's last slot valid); None where it does not apply."""
    from alignment.fast_generation import decode_attention, decode_attention_triton

    config = model.config
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, config.num_attention_heads, 1, D, device=device, generator=gen).bfloat16()
    k, v = (torch.randn(B, config.num_key_value_heads, T, D, device=device, generator=gen).bfloat16() for _ in "kv")
    valid = torch.rand(B, T, device=device, generator=gen) < 0.7
    valid[:, -1] = True
    if device.type != "cuda":
        return None
    ref, _ = decode_attention(None, q, k, v, valid[:, None, None, :], scaling=D**-0.5)
    out, _ = decode_attention_triton(None, q, k, v, valid[:, None, None, :], scaling=D**-0.5)
    return float((out.float() - ref.float()).abs().max())


def sampler_check(B: int, V: int, device, draws: int = 2048, temperature: float = 1.0) -> dict | None:
    """The Triton sampler on ``[B, V]`` bf16 logits: each row the same fixed row (16 heavy tokens, at
    logit 10 ± 0.5, spread over the vocabulary up to its last token; the rest N(0, 1)), ``draws``
    draws in ``[B, V]`` calls. Largest |frequency − softmax(row / T)| over all tokens, the tolerance
    (4 standard errors of the likeliest token's frequency), and µs per draw of the sampler and of the
    compiled race (noise included), CUDA events over 200 draws; None off CUDA or without Triton."""
    from alignment import triton_sampling
    from alignment.generation import _compiled_race, race_noise

    gen = torch.Generator(device=device).manual_seed(0)
    row = torch.randn(V, device=device, generator=gen)
    heavy = torch.linspace(0, V - 1, 16, device=device).long()
    row[heavy] = 10 + 0.5 * torch.randn(16, device=device, generator=gen)
    logits = row.bfloat16().repeat(B, 1)
    if device.type != "cuda" or not triton_sampling.supported(logits):
        return None
    probs = torch.softmax(logits[0].double() / temperature, dim=0)
    sampler = triton_sampling.GumbelSampler(device, gen)
    counts = torch.zeros(V, dtype=torch.float64, device=device)
    calls = -(-draws // B)
    for _ in range(calls):
        counts += torch.bincount(sampler(logits, temperature), minlength=V).double()
    n = calls * B
    out = {"draws": n, "max_abs_diff": float((counts / n - probs).abs().max()),
           "tolerance": float(4 * (probs.max() * (1 - probs.max()) / n).sqrt()),
           "never_drawn_mass": float(probs[counts == 0].sum())}
    out["ok"] = out["max_abs_diff"] <= out["tolerance"]

    def us_per_draw(fn):
        for _ in range(10):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            fn()
        end.record()
        torch.cuda.synchronize()
        return 1000 * start.elapsed_time(end) / 200

    out["triton_us_per_draw"] = us_per_draw(lambda: sampler(logits, temperature))
    out["race_us_per_draw"] = us_per_draw(
        lambda: _compiled_race()(logits, race_noise(logits.shape, device, gen), temperature))
    return out


def run_shape(shape: str, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device_t
    folder = build_shape(args.work, shape, device)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(folder))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    model.generation_config.pad_token_id = 0
    rng = random.Random(1)
    prompts = [tok(words(rng, args.prompt_len, SHAPES[shape]["vocab_size"]))["input_ids"][: args.prompt_len]
               for _ in range(args.batch)]
    ids, _ = left_pad(prompts, 0)
    ids = ids.to(device)
    B, P = ids.shape
    N = args.new_tokens
    settings = GenerationSettings(max_new_tokens=N, batch_size=B, do_sample=True, cuda_graphs=True)
    greedy = settings.model_copy(update={"do_sample": False})
    weight_bytes, kv_bytes = decode_step_bytes(model, B, P + N / 2)
    out: dict = {"shape": shape, "batch": B, "prompt_len": P, "new_tokens": N, "copy_tbps": args.tbps,
                 "weight_gb": weight_bytes / 1e9, "kv_gb_avg": kv_bytes / 1e9}
    out["bound_ms_per_step"] = 1000 * (weight_bytes + kv_bytes) / (args.tbps * 1e12)

    def timed(fn, reps):
        times = []
        for _ in range(reps):
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - started)
        return {"runs_s": [round(t, 4) for t in times], "ms_per_step": 1000 * min(times) / N,
                "new_tokens_per_s": B * N / min(times)}

    with torch.no_grad():
        out["model.generate"] = {"ms_per_step": float("nan"), "runs_s": [], "new_tokens_per_s": float("nan")}
        if args.gen_reps:
            out["model.generate"] = timed(lambda: model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=N,
                min_new_tokens=N, pad_token_id=0), args.gen_reps)
        fast = settings.model_copy(update={"compile_step": True})  # the compiled sampler
        # name: (decoder class, fuse, settings, Triton sampler)
        paths = {"step_graph": (StepGraphDecoder, False, settings, False),
                 "advance_graph": (GraphDecoder, False, settings, False),
                 "advance_sampler": (GraphDecoder, False, fast, False), "advance_fused": (GraphDecoder, True, fast, False),
                 "advance_triton": (GraphDecoder, "triton", fast, False),
                 "advance_triton_sampler": (GraphDecoder, "triton", fast, True),
                 "advance_triton_update": (GraphDecoder, "update", fast, True)}
        tokens = {}
        for name, (cls, fuse, s, ts) in paths.items():
            if not args.checks and name not in args.paths.split(","):
                continue  # no checks: only the timed paths decode (each compiles once)
            tokens[name] = decode(model, ids, s, cls, fuse=fuse, triton_sampler=ts)[0].cpu()  # compiles on the first
            print(f"# {shape} {name}: warm", flush=True)
            if name not in args.paths.split(","):
                continue
            out[name] = timed(lambda cls=cls, fuse=fuse, s=s, ts=ts: decode(model, ids, s, cls, fuse=fuse, triton_sampler=ts),
                              args.reps)
            # Steady state: what one more token costs once the batch is prefilled and its graph captured.
            short = s.model_copy(update={"max_new_tokens": args.short_tokens})
            shorter = timed(lambda cls=cls, fuse=fuse, s=short, ts=ts: decode(model, ids, s, cls, fuse=fuse,
                                                                                triton_sampler=ts), args.reps)
            out[name]["short_runs_s"] = shorter["runs_s"]
            out[name]["marginal_ms_per_step"] = (1000 * (min(out[name]["runs_s"]) - min(shorter["runs_s"]))
                                                 / (N - args.short_tokens))
            out[name]["fixed_ms_per_call"] = min(out[name]["runs_s"]) * 1000 - N * out[name]["marginal_ms_per_step"]
            print(f"# {shape} {name}: {out[name]['ms_per_step']:.3f} ms/step", flush=True)
        if not args.checks:
            return finish(out, paths)
        out["check_advance_samples_equal_step_graph"] = bool(torch.equal(tokens["advance_graph"], tokens["step_graph"]))
        first = (tokens["advance_sampler"] == tokens["advance_graph"]).long().cumprod(dim=1).sum(dim=1)
        out["check_compiled_sampler_equal_prefix"] = float(first.float().mean() / N)
        g_ref = decode(model, ids, greedy, StepGraphDecoder)[0].cpu()
        g_fused = decode(model, ids, greedy, GraphDecoder, fuse=True)[0].cpu()
        same = (g_ref == g_fused).long().cumprod(dim=1).sum(dim=1)  # equal prefix per row
        out["check_greedy_fused_equal_prefix"] = float(same.float().mean() / N)
        g_triton = decode(model, ids, greedy, GraphDecoder, fuse="triton")[0].cpu()
        same = (g_ref == g_triton).long().cumprod(dim=1).sum(dim=1)
        out["check_greedy_triton_equal_prefix"] = float(same.float().mean() / N)
        g_update = decode(model, ids, greedy, GraphDecoder, fuse="update")[0].cpu()
        same = (g_triton == g_update).long().cumprod(dim=1).sum(dim=1)
        out["check_greedy_update_equal_triton_prefix"] = float(same.float().mean() / N)
        out["check_triton_attention_max_abs_diff"] = attention_check(model, B, P + N, device)
        tok = tokens["advance_triton_sampler"]
        out["check_triton_sampler_tokens_in_vocab"] = bool(((tok >= 0) & (tok < model.config.vocab_size)).all())
        out["check_triton_sampler"] = sampler_check(B, model.config.vocab_size, device)
        if device.type == "cuda" and args.profile:
            for name, (cls, fuse, s, ts) in paths.items():
                if name not in out:
                    continue
                out[name]["profile"] = kernels_per_step(model, ids, s, cls, fuse, ts)
    return finish(out, paths)


def finish(out: dict, paths) -> dict:
    """``out`` with each timed path's fraction of the bound."""
    for name in ("model.generate", *paths):
        if name in out:
            out[name]["fraction_of_bound"] = out["bound_ms_per_step"] / out[name]["ms_per_step"]
            if "marginal_ms_per_step" in out[name]:
                out[name]["marginal_fraction_of_bound"] = out["bound_ms_per_step"] / out[name]["marginal_ms_per_step"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="qwen0.5b,llama1b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gen-reps", type=int, default=3)
    parser.add_argument("--paths", default=",".join(PATHS), help="timed paths (the checks decode all)")
    parser.add_argument("--short-tokens", type=int, default=32, help="the short decode of the marginal cost")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--no-checks", dest="checks", action="store_false",
                        help="time the --paths only: no checks, no profile, untimed paths not decoded")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", default="/tmp/gpu_bench")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_decode_out"))
    args = parser.parse_args()
    args.device_t = torch.device(args.device)
    args.work = Path(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.cache_size_limit = 64
    args.tbps = copy_tbps(args.device_t, 2**29) if args.device_t.type == "cuda" else 0.05  # 1 GiB copies
    device_name = torch.cuda.get_device_name(args.device_t) if args.device_t.type == "cuda" else "cpu"
    print(f"# device {device_name}, torch {torch.__version__}, copy {args.tbps:.2f} TB/s", flush=True)
    with (out_dir / "decode.jsonl").open("a") as log:
        for shape in args.shapes.split(","):
            record = run_shape(shape, args)
            record["device"] = device_name
            log.write(json.dumps(record) + "\n")
            log.flush()  # each shape's record survives a later shape's timeout
            print(f"\n## {shape}: bound {record['bound_ms_per_step']:.3f} ms/step "
                  f"(weights {record['weight_gb']:.2f} GB + KV {record['kv_gb_avg']:.2f} GB at {args.tbps:.2f} TB/s)")
            print("| path | ms/step (whole call) | new tokens/s | fraction of bound | ms/step (steady state) | "
                  "fraction of bound | fixed ms per call | runs (s) |\n|---|---|---|---|---|---|---|---|")
            for name in ("model.generate", *PATHS):
                r = record.get(name)
                if r is None:
                    continue
                steady = (f"{r['marginal_ms_per_step']:.3f} | {100 * r['marginal_fraction_of_bound']:.1f}% | "
                          f"{r['fixed_ms_per_call']:.0f}" if "marginal_ms_per_step" in r else " | | ")
                print(f"| {name} | {r['ms_per_step']:.3f} | {r['new_tokens_per_s']:,.0f} | "
                      f"{100 * r['fraction_of_bound']:.1f}% | {steady} | {r['runs_s']} |")
            if "check_advance_samples_equal_step_graph" not in record:
                continue  # --no-checks
            print(f"checks: advance samples == step_graph samples: {record['check_advance_samples_equal_step_graph']}; "
                  f"compiled sampler vs eager equal prefix {100 * record['check_compiled_sampler_equal_prefix']:.1f}%; "
                  f"greedy fused vs unfused equal prefix {100 * record['check_greedy_fused_equal_prefix']:.1f}%; "
                  f"greedy Triton attention vs unfused {100 * record['check_greedy_triton_equal_prefix']:.1f}%; "
                  f"greedy fused update vs Triton attention {100 * record['check_greedy_update_equal_triton_prefix']:.1f}%; "
                  f"Triton vs torch attention max |diff| {record['check_triton_attention_max_abs_diff']}; "
                  f"Triton sampler's tokens in the vocabulary: {record['check_triton_sampler_tokens_in_vocab']}")
            sc = record["check_triton_sampler"]
            if sc is not None:
                print(f"Triton sampler vs softmax over {sc['draws']} draws at [{record['batch']}, V]: max |freq - p| "
                      f"{sc['max_abs_diff']:.4f} (tolerance {sc['tolerance']:.4f}: {'ok' if sc['ok'] else 'FAILED'}); "
                      f"one draw {sc['triton_us_per_draw']:.1f} us (compiled race {sc['race_us_per_draw']:.1f} us)")
            for name in PATHS:
                prof = record.get(name, {}).get("profile")
                if prof:
                    print(f"{name}: {prof['kernels_per_step']:.0f} kernels/step, GPU {prof['gpu_ms_per_step']:.3f} ms/step")
                    for row in prof["top"]:
                        print("   ", row)


if __name__ == "__main__":
    main()
