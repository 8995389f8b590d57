"""The persistent decoder-layer kernel (alignment.triton_layers) alone: time per decode step, per stage, and
its logits against transformers' (issue 16, point 4).

For a shape (random bf16 weights, built as ``gpu_bench.py`` builds them): batch 64 × 128-token prompts
prefilled into a static cache of 384 slots, then, for each tile setting, the kernel launched back to back
at slot 256 (the average context of a 256-token decode), timed with CUDA events over ``--iters`` launches
(a ``torch.cuda.graph`` of ``--graph-steps`` launches replayed, as the decode runs it). Printed: µs per
launch (the embedding, all layers, the final norm; not the LM head), µs per layer, the layers' share of the
step's memory-bandwidth bound (their weights and K/V at 256 slots over the measured copy bandwidth) and, with ``--stages``, each stage alone (the
kernel with the other stages switched off: a cost breakdown, not a result). Check: one decode step's
logits through the kernel against transformers' forward of the same token (largest |difference|, and the
share of rows whose top token agrees).

    python3 benchmarks/gpu_layers.py --shape qwen0.5b --tiles '[{}, {"num_warps": 8}]' --stages --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment import triton_layers  # noqa: E402
from alignment.fast_generation import GraphDecoder  # noqa: E402
from benchmarks.gpu_bench import build_shape, copy_tbps  # noqa: E402


def events_us(fn, iters: int) -> float:
    """Mean µs of ``fn()`` over ``iters`` calls after 3 warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen0.5b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--tiles", type=json.loads, default=[{}])
    parser.add_argument("--stages", action="store_true", help="also time each stage alone (first tile setting)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--graph-steps", type=int, default=10)
    parser.add_argument("--work", default="/tmp/gpu_bench")
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_layers_out"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tbps = copy_tbps(device, 2**29)
    model = AutoModelForCausalLM.from_pretrained(build_shape(work, args.shape, device), dtype=torch.bfloat16)
    model = model.to(device).eval()
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (B, P), device=device, generator=gen)
    record = {"shape": args.shape, "device": torch.cuda.get_device_name(device), "copy_tbps": tbps, "batch": B,
              "slots": P + N, "context": P + N // 2, "runs": []}
    print(f"# {record['device']}, copy {tbps:.2f} TB/s, {args.shape}, batch {B}, cache {P + N} slots", flush=True)
    with torch.no_grad():
        for i, tiles in enumerate(args.tiles):
            decoder = GraphDecoder(model, use_graph=False, triton_layers=True, layer_tiles=tiles)
            logits = decoder.prefill(ids, torch.ones_like(ids), N)
            layers = decoder.layers
            token = logits.argmax(-1)
            if i == 0:  # the check: one step through the kernel against transformers' forward of the same token
                ref_decoder = GraphDecoder(model, use_graph=False)
                ref_decoder.prefill(ids, torch.ones_like(ids), N)
                want = ref_decoder.step(token).float()
                got = decoder.step(token).float()
                record["check_max_abs_diff"] = float((got - want).abs().max())
                record["check_top1_agree"] = float((got.argmax(-1) == want.argmax(-1)).float().mean())
                print(f"# check: max |logits diff| {record['check_max_abs_diff']:.4f} (logits up to "
                      f"{want.abs().max():.1f}), top-1 agrees on {100 * record['check_top1_agree']:.1f}% of rows",
                      flush=True)
            slot = torch.tensor([P + N // 2], device=device)
            valid = torch.zeros(B, P + N, dtype=torch.bool, device=device)
            valid[:, : P + N // 2 + 1] = True
            positions = torch.full((B, 1), P + N // 2, device=device)
            step_ids = token[:, None].contiguous()
            bound_us = 1000 * triton_layers.bandwidth_bound_ms(layers, tbps, P + N // 2, head=False)

            def timed(layers, step_ids, positions, slot, valid, stages_on=31):
                layers.tiles = {**layers.tiles, "on": stages_on}
                graph = torch.cuda.CUDAGraph()
                layers._launch(step_ids, positions, slot, valid)  # compiles
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    for _ in range(args.graph_steps):
                        layers._launch(step_ids, positions, slot, valid)
                us = events_us(graph.replay, args.iters) / args.graph_steps
                assert not layers.failed, "a grid barrier timed out"
                return us

            us = timed(layers, step_ids, positions, slot, valid)
            run = {"tiles": layers.tiles, "us_per_step": us, "us_per_layer": us / layers.L, "bound_us": bound_us,
                   "fraction_of_bound": bound_us / us}
            print(f"| {json.dumps(tiles)} | {us:.1f} us/step | {us / layers.L:.2f} us/layer | layers' bound "
                  f"{bound_us:.1f} us: {100 * bound_us / us:.1f}% |", flush=True)
            if args.stages and i == 0:
                run["stage_us"] = {}
                for s, name in enumerate(("qkv", "attention", "o", "gate_up", "down")):
                    run["stage_us"][name] = timed(layers, step_ids, positions, slot, valid, 1 << s)
                run["stage_us"]["barriers_only"] = timed(layers, step_ids, positions, slot, valid, 0)
                print("# stages alone (us/step): " + ", ".join(f"{k} {v:.1f}" for k, v in run["stage_us"].items()),
                      flush=True)
            record["runs"].append(run)
            decoder = layers = None
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "layers.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
