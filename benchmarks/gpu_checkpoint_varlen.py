"""Gradient checkpointing under varlen attention: does the recomputation see the same attention?

    python3 benchmarks/gpu_checkpoint_varlen.py --device cuda
    .venv/bin/python benchmarks/gpu_checkpoint_varlen.py --device cpu

Run 17 (RESULTS.md) found that our recipes could not train with ``gradient_checkpointing`` and
``varlen_attention`` on a GPU: ``torch.utils.checkpoint`` raised ``CheckpointError`` (recomputed
tensors with other metadata than the forward's). Fixed since in ``alignment.models``
(``same_attention_on_recompute``, a checkpoint ``context_fn``); this script enables checkpointing
itself, so it still shows the raw behaviour the fix works around. ``alignment.models.decoder_hidden`` switches the
model's attention implementation to varlen with a context manager around the forward only; the
non-reentrant checkpoint recomputes each layer during the backward, outside that block, under the
model's own attention (SDPA here), which saves other tensors. This script shows it on a two-layer
Llama of random weights and one packed row of two sequences: the plain backward with checkpointing
(fails), and the same backward with the varlen implementation kept around it (its gradients are
compared with an unchecked run's). On the CPU the varlen path is ``_varlen_by_sequence``; on a GPU,
flash attention's varlen kernel in bf16.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def _model(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def _grads(device: torch.device, dtype: torch.dtype, checkpoint: bool, keep_for_backward: bool) -> list[torch.Tensor]:
    from alignment.fast_paths import VARLEN_ATTENTION, attention_implementation
    from alignment.models import decoder_hidden, enable_checkpointing

    model = _model(device, dtype)
    if checkpoint:
        enable_checkpointing(model, {"use_reentrant": False})
    gen = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, 100, (1, 8), generator=gen).to(device),
             "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=device),
             "cu_seq_lens": torch.tensor([0, 5, 8], dtype=torch.int32, device=device), "max_seq_len": 5}
    loss = decoder_hidden(model, batch, varlen=True).float().square().sum()
    if keep_for_backward:
        with attention_implementation(model.config, VARLEN_ATTENTION):
            loss.backward()
    else:
        loss.backward()
    return [p.grad.float() for p in model.parameters() if p.grad is not None]


def check(device: str = "cpu") -> dict:
    """``checkpointed``: "ok" or the error of a checkpointed backward as the recipes run it;
    ``kept_max_grad_diff``: the largest gradient difference between a checkpointed backward run
    under the varlen implementation and an unchecked one."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    reference = _grads(dev, dtype, checkpoint=False, keep_for_backward=False)
    try:
        _grads(dev, dtype, checkpoint=True, keep_for_backward=False)
        checkpointed = "ok"
    except Exception as err:  # noqa: BLE001 - the finding itself
        checkpointed = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    kept = _grads(dev, dtype, checkpoint=True, keep_for_backward=True)
    diff = max((a - b).abs().max().item() for a, b in zip(reference, kept, strict=True))
    return {"device": device, "checkpointed": checkpointed, "kept_max_grad_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(check(parser.parse_args().device)))


if __name__ == "__main__":
    main()
