"""The CUDA token draw alone: the Triton Gumbel-max sampler (alignment.triton_sampling) against the
compiled exponential race it replaces in the compiled decode, µs per draw of one token per row of
[B, V] bf16 logits, each draw replayed back to back inside a CUDA graph (as the decode replays it;
best of 5 timings of 20 replays of 20 draws). Block sizes and the fast log are swept; the module's
defaults are BLOCK = 2048, 4 warps, accurate log. No check here: tests/unit/test_triton_sampling.py
checks the draw's distribution, and benchmarks/gpu_decode.py checks it on the decode's own shape.

    python3 benchmarks/gpu_sampler.py        # needs CUDA and Triton
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment import triton_sampling as ts  # noqa: E402
from alignment.generation import _compiled_race, race_noise  # noqa: E402


def graph_us(fn, per_graph: int = 20, reps: int = 20) -> float:
    """µs per call of ``fn``: ``per_graph`` calls captured in one CUDA graph, replayed ``reps`` times, best of 5."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, 1000 * start.elapsed_time(end) / (reps * per_graph))
    return best


def main() -> None:
    import triton

    dev = torch.device("cuda")
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    for B, V in [(64, 151936), (64, 128256), (8, 151936)]:
        logits = torch.randn(B, V, device=dev).bfloat16()
        row = {"race": graph_us(lambda logits=logits: _compiled_race()(logits, race_noise(logits.shape, dev, None), 1.0))}
        for fast in (False, True):
            ts._FAST_LOG = fast
            for block, warps in ((1024, 4), (2048, 4), (4096, 8)):
                state = ts.new_state(dev)
                row[f"{'fast log' if fast else 'log'} b{block} w{warps}"] = graph_us(
                    lambda logits=logits, state=state, block=block, warps=warps:
                    ts.gumbel_sample(logits, state, 1.0, block=block, num_warps=warps))
        ts._FAST_LOG = False
        print(f"[{B}, {V}] µs per draw:", {k: round(v, 1) for k, v in row.items()}, flush=True)


if __name__ == "__main__":
    main()
