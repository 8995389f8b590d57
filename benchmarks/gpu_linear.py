"""The decode step's projections one at a time: cuBLAS (through ``F.linear``, the compiled SiLU·mul for
the MLP's gate/up) against :mod:`alignment.triton_linear`, autotuned and at each fixed config.

Shapes: every projection of the 0.5B (Qwen2.5-0.5B) and 1B (Llama-3.2-1B) decode at batch 64, bf16:
q/k/v (fused, with Qwen2's bias), the attention output, gate/up (fused; the Triton kernel also applies
SiLU·mul) and down. Each case runs 100 calls back to back inside one CUDA graph (as the decode step
runs its kernels), replayed 20 times; µs per call = the fastest replay / 100, and GB/s = the
weight bytes read per call / that time. The calls cycle through copies of the weight that together
exceed the 50 MB L2 cache (``--hot`` reuses one copy: what an L2-resident weight costs), so each call
reads its weight from memory as a decode step does. Also prints the largest |Triton − reference| per
case, and writes the fastest config per case (``--plans-out``) for
``benchmarks/gpu_decode.py --linear-plans``.

    python3 benchmarks/gpu_linear.py --cases 0.5b.qkv,0.5b.o,0.5b.gate_up,0.5b.down --plans-out $OUT/plans.json --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment import triton_linear  # noqa: E402

# name: (N outputs, K inputs, bias, gated)
CASES = {
    "0.5b.qkv": (1152, 896, True, False), "0.5b.o": (896, 896, False, False),
    "0.5b.gate_up": (4864, 896, False, True), "0.5b.down": (896, 4864, False, False),
    "1b.qkv": (3072, 2048, False, False), "1b.o": (2048, 2048, False, False),
    "1b.gate_up": (8192, 2048, False, True), "1b.down": (2048, 8192, False, False),
}


@torch.compile
def gated_reference(x, weight):
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    return F.silu(gate) * up


def us_per_call(fn, copies: int, calls: int = 100, replays: int = 20) -> float:
    """``fn(i)`` uses weight copy ``i``."""
    fn(0)  # compile / warm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i % copies)
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000 / calls)
    return best


def run_case(name: str, args, count: torch.Tensor, gen: torch.Generator) -> dict:
    """One projection: cuBLAS, the heuristic plan and every config of ``triton_linear.CONFIGS``."""
    n, k, has_bias, gated = CASES[name]
    device = count.device
    rows = 2 * n if gated else n
    x = torch.randn(args.rows, k, device=device, generator=gen, dtype=torch.bfloat16)
    mb = rows * k * 2 / 1e6
    copies = 1 if args.hot else max(2, int(200 // mb) + 1)  # > 200 MB of weights: none stays in L2
    ws = [torch.randn(rows, k, device=device, generator=gen, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    b = torch.randn(n, device=device, generator=gen, dtype=torch.bfloat16) if has_bias else None

    def ref(i):
        return gated_reference(x, ws[i]) if gated else F.linear(x, ws[i], b)

    def fast(i, config=None):
        return triton_linear.linear(x, ws[i], b, count, gated=gated, config=config)

    r = {"case": name, "n": n, "k": k, "gated": gated, "weight_mb": mb, "copies": copies,
         "cublas_us": us_per_call(ref, copies), "triton_us": us_per_call(fast, copies),
         "plan": triton_linear.plan(n, k, gated), "max_abs_diff": float((fast(0).float() - ref(0).float()).abs().max()),
         "configs": {}}
    for config in triton_linear.CONFIGS:
        try:
            r["configs"][str(config)] = us_per_call(functools.partial(fast, config=config), copies)
        except triton.runtime.errors.OutOfResources:  # too much shared memory for these blocks
            continue
    best = min(r["configs"].items(), key=lambda kv: kv[1])
    r["best"] = [int(v) for v in best[0].strip("()").split(",")]
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--hot", action="store_true", help="one weight copy (L2-resident) instead of copies past L2")
    parser.add_argument("--plans-out", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_linear_out"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    count = triton_linear.counters(device)
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, rows {args.rows}")
    print("| case | weight MB | cuBLAS µs (GB/s) | Triton, heuristic plan µs (GB/s) | best config µs | max abs diff |")
    print("|---|---|---|---|---|---|")
    records = []
    for name in args.cases.split(","):
        r = run_case(name, args, count, gen)
        records.append(r)
        mb = r["weight_mb"]
        best = min(r["configs"].items(), key=lambda kv: kv[1])
        print(f"| {name} | {mb:.1f} | {r['cublas_us']:.2f} ({mb * 1e3 / r['cublas_us']:.0f}) | "
              f"{r['triton_us']:.2f} ({mb * 1e3 / r['triton_us']:.0f}) | {best[1]:.2f} {best[0]} | "
              f"{r['max_abs_diff']:.4f} |", flush=True)
    with (out_dir / "linear.jsonl").open("a") as log:
        for r in records:
            log.write(json.dumps(r) + "\n")
    if args.plans_out:
        Path(args.plans_out).write_text(json.dumps([[r["n"], r["k"], r["gated"], r["best"]] for r in records]))


if __name__ == "__main__":
    main()
