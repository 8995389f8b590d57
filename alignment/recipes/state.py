"""Training-state helpers of the recipe lifecycle: trainable weights, RNG streams, lr schedule.

Pure functions: :class:`alignment.recipes.checkpoint.Checkpointer` (the only code that touches
checkpoint files) writes and restores weights and RNG streams with them, and
:mod:`alignment.recipes.optim` builds the schedule from :func:`lr_lambda`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, by name, as contiguous CPU tensors (tied weights once)."""
    return {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``module``'s trainable parameters. Raises ValueError on a name or shape mismatch."""
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{source}: trainable weights do not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, model has {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and (if present) all CUDA generator states: plain values (numpy's
    key as a list of ints) and uint8 CPU tensors, so a checkpoint stores them without a pickle."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str, min_ratio: float = 0.0) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s``: linear warmup, then constant, or a
    linear/cosine decay d(p) from 1 to 0 over the progress p, floored: min_ratio + (1 - min_ratio) * d(p)."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_ratio + (1.0 - min_ratio) * decay

    return factor
