"""What the DPO and KTO recipes share about their reference model: the no-grad reference forward
(a frozen copy, or the policy with its LoRA adapter off) and the precomputed log-probs read from
the on-disk cache (:mod:`alignment.refcache`) or computed once and written there.

Plain functions over the recipe's parts, so each recipe keeps its own data layout (pairs, or
unpaired rows with mismatched partners) and calls these for the parts that are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from alignment.models import adapter_disabled
from alignment.refcache import RefLogpsCache


def ref_cache_folder(ref_cache_dir: str | None, output_dir: Path | None) -> str | None:
    """``ref_cache_dir`` when set, else ``<output_dir>/ref_cache`` (None: no run folder, no cache)."""
    return ref_cache_dir or (str(output_dir / "ref_cache") if output_dir else None)


@torch.no_grad()
def reference_logps(accelerator: Accelerator, train_module: nn.Module, model: nn.Module,
                    parts: Sequence[dict], module: nn.Module | None = None) -> torch.Tensor:
    """Per-sequence reference log-probs of each batch in ``parts``, concatenated (no grad, no
    dropout): ``module`` (a frozen copy) when given, else the policy with its adapter switched off
    (equal to the initial policy under LoRA). The policy's train/eval mode is put back."""
    def run(forward: Callable[[dict], dict]) -> torch.Tensor:
        seqs = [forward(p)["seq_logps"] for p in parts]
        return seqs[0] if len(seqs) == 1 else torch.cat(seqs)

    with accelerator.autocast():
        if module is not None:
            return run(module)
        policy = accelerator.unwrap_model(train_module)
        was_training = policy.training
        policy.eval()
        try:
            with adapter_disabled(model):
                return run(policy)
        finally:
            policy.train(was_training)


def cached_or_computed(accelerator: Accelerator, folder: str | None, key: str, indices: list[int],
                       compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
    """The two reference log-prob tensors of ``indices`` under ``key``: from the cache in
    ``folder``, or from ``compute()`` (then written by the main process). Returns them and whether
    the cache had them. The main process goes first, so the others read what it wrote."""
    cache = RefLogpsCache(folder) if folder else None
    with accelerator.main_process_first():
        found = cache.load(key, indices) if cache else None
        if found is not None:
            return found, True
        found = compute()
        if cache and accelerator.is_main_process:
            cache.save(key, indices, *found)
        return found, False
