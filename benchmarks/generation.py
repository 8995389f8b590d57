"""Rollout generation: :func:`alignment.generation.generate` against ``model.generate``.

    .venv/bin/python benchmarks/generation.py                      # CPU: a small Llama shape
    python3 benchmarks/generation.py --device cuda --hidden 1024 --layers 12 --vocab 32000 \\
        --batch 64 --prompt-len 128 --new-tokens 256 --dtype bfloat16

A random-weight Llama shape (no downloads), random prompt tokens, sampling at temperature 1
with EOS disabled, so every path generates exactly ``batch x new_tokens`` tokens. Each path
runs twice and both timings print: the first run pays one-time costs (on an H100 with torch
2.11, cuDNN attention builds an execution plan for every new KV length, about 7x slower on
the first pass), the second is the steady state. ``--padded`` draws prompt lengths from
[prompt_len/2, prompt_len] (left padding, as real rollouts have).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class _IdsTokenizer:
    """Prompts are space-separated token ids; nothing is decoded (only throughput matters here)."""

    pad_token_id, bos_token_id, eos_token_id, chat_template = 0, 1, 2, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(x) for x in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--padded", action="store_true")
    parser.add_argument("--no-cudnn-sdp", action="store_true", help="disable cuDNN attention (CUDA)")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignment.config import GenerationSettings
    from alignment.generation import generate, left_pad

    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device(args.device)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                         max_position_embeddings=args.prompt_len + args.new_tokens + 8, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, getattr(torch, args.dtype)).eval()
    gen = torch.Generator().manual_seed(0)
    lo = args.prompt_len // 2 if args.padded else args.prompt_len
    lengths = torch.randint(lo, args.prompt_len + 1, (args.batch,), generator=gen).tolist()
    prompts = [" ".join(map(str, torch.randint(3, args.vocab, (n,), generator=gen).tolist())) for n in lengths]
    ids, mask = left_pad([[int(x) for x in p.split()] for p in prompts], 0)
    ids, mask = ids.to(device), mask.to(device)
    settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=args.batch)
    tok = _IdsTokenizer()
    paths = {
        "model.generate": lambda: model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                 pad_token_id=0),
        "ours (dynamic cache)": lambda: generate(model, tok, prompts, settings, seed=0, eos_token_ids=[-1]),
        "ours (static cache)": lambda: generate(model, tok, prompts, settings, seed=0, eos_token_ids=[-1],
                                                cache="static"),
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    print(f"# generation: Llama {args.layers}x{args.hidden}, vocab {args.vocab}, {args.dtype} on {args.device}, "
          f"batch {args.batch} x prompt {'<=' if args.padded else ''}{args.prompt_len} + {args.new_tokens} new tokens, "
          f"torch {torch.__version__}")
    print("| path | new tokens/s (1st run) | new tokens/s (2nd run) | ms per decode step (2nd) |")
    print("|---|---|---|---|")
    n = args.batch * args.new_tokens
    for name, fn in paths.items():
        rates = []
        for _ in range(2):
            sync()
            started = time.perf_counter()
            fn()
            sync()
            rates.append(n / (time.perf_counter() - started))
        print(f"| {name} | {rates[0]:,.0f} | {rates[1]:,.0f} | {1000 * args.batch / rates[1]:.2f} |")


if __name__ == "__main__":
    main()
