"""How many graphs ``torch.compile(dynamic=True)`` builds for one decoder layer over changing token counts.

    .venv/bin/python benchmarks/gpu_recompiles.py --shape tiny-llama --tokens 2624,4544,13248
    .venv/bin/python benchmarks/gpu_recompiles.py --shape tiny-llama --tokens 2624,4544,13248 --size-oblivious
    python3 benchmarks/gpu_recompiles.py --shape llama1b --tokens 1152,3072,4544,8192 --size-oblivious  # the device

The recipes compile each decoder layer with dynamic shapes (alignment.fast_paths.compile_layers),
and one-row packed batches change the token count S every step. Inductor still adds guards on S
when it picks kernels from the first size it sees (run 15, RESULTS.md: ``2560 <= S <= 4095`` for
the Llama-1B layer and ``896*S < 5242880`` for the Qwen-0.5B layer on an H100, from its
scheduler's ``can_fuse``; ``S <= 4096`` on a CPU, from ``need_use_acc_helper``), so the first
batch outside the range compiles a second graph, inside a timed window if it comes late. This
script runs one layer forward and backward (rotary embeddings as the model makes them, SDPA
causal attention) at each ``--tokens`` count and prints the graphs compiled and each
recompilation's guard; ``--size-oblivious`` sets ``torch.fx.experimental._config.
backed_size_oblivious``, under which sizes are reasoned about without their example values (one
graph for all three counts on the CPU, 2026-12-05; on an H100, run 16, the compiled backward of the
first size failed ``assert_size_stride`` on SDPA's saved log-sum-exp: the fake strides differ from
the CUDA kernel's, so the recipes do not use it).
``--lora`` puts LoRA r16 on every linear of the layer (base weights frozen) and runs, at each
count, the training pass and then the DPO reference pass as the recipe does under
``reference: adapter_disabled`` (adapters off, no grad): the graphs a LoRA run compiles.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TINY = {"tiny-llama": dict(kind="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2)}


def layer_of(shape: str, device: torch.device, dtype: torch.dtype):
    """(decoder layer, rotary embedding) of ``shape`` (gpu_bench.SHAPES or TINY), random weights."""
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from benchmarks.gpu_bench import SHAPES

    spec = dict(TINY.get(shape) or SHAPES[shape])
    kind = spec.pop("kind")
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    common = {k: spec[k] for k in keys} | {"max_position_embeddings": 32768}
    cfg = (LlamaConfig if kind == "llama" else Qwen2Config)(**common)
    cfg._attn_implementation = "sdpa"
    layer_cls, rope_cls = ((LlamaDecoderLayer, LlamaRotaryEmbedding) if kind == "llama"
                           else (Qwen2DecoderLayer, Qwen2RotaryEmbedding))
    with torch.device(device):
        return layer_cls(cfg, 0).to(dtype), rope_cls(cfg), cfg.hidden_size


def lora_layers(layer) -> list:
    """Inject LoRA r16 into every linear of ``layer`` (base frozen); the tuner layers, to switch off."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = sorted({n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)})
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=names), layer)
    for name, param in layer.named_parameters():
        param.requires_grad = "lora_" in name
    return [m for m in layer.modules() if isinstance(m, BaseTunerLayer)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny-llama")
    parser.add_argument("--tokens", default="2624,4544,13248", help="token counts S, in order")
    parser.add_argument("--size-oblivious", action="store_true")
    parser.add_argument("--lora", action="store_true", help="LoRA r16 layer: training pass + adapter-off no-grad pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    import torch.fx.experimental._config as fx_config
    from torch._dynamo.utils import counters

    fx_config.backed_size_oblivious = args.size_oblivious
    reasons: list[str] = []

    class Log(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "ecompil" in record.getMessage():
                reasons.append(record.getMessage())

    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(Log())
    device = torch.device(args.device)
    dtype = torch.float32
    layer, rope, hidden = layer_of(args.shape, device, dtype)
    tuners = lora_layers(layer) if args.lora else []
    layer.compile(dynamic=True)

    def call(x, positions):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope(x, positions))
        return out[0] if isinstance(out, tuple) else out

    for n in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(1, n, hidden, device=device, dtype=dtype, requires_grad=True)
        positions = torch.arange(n, device=device)[None]
        started = time.perf_counter()
        call(x, positions).float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        line = f"S={n}: {time.perf_counter() - started:.2f} s"
        if tuners:  # the reference pass: adapters off, no grad
            started = time.perf_counter()
            for t in tuners:
                t.enable_adapters(False)
            with torch.no_grad():
                call(x.detach(), positions)
            for t in tuners:
                t.enable_adapters(True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            line += f", reference pass {time.perf_counter() - started:.2f} s"
        print(f"{line}, graphs so far {counters['stats']['unique_graphs']}", flush=True)
    print(f"graphs compiled: {counters['stats']['unique_graphs']} (size_oblivious={args.size_oblivious})")
    for reason in reasons:
        print("RECOMPILE:", " | ".join(line.strip() for line in reason.splitlines())[:400])


if __name__ == "__main__":
    main()
