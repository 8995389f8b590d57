"""Supervised recipes (SFT, reward model, DPO family): a loss per collated micro-batch.

A subclass writes ``build_models()``, ``build_data()`` and ``compute_loss(batch)``: one
micro-batch (a collated dict already on the device, inside autocast) → :class:`StepOutput`,
called with grad for training and under ``no_grad`` (module in eval mode) for evaluation.

One training step (:meth:`SupervisedRecipe.train_step`) reads top to bottom: ``grad_accum``
micro-batches, each forwarded, its loss scaled and backpropagated (DDP syncs only on the last),
the next micro-batch collated on the CPU while the device works (prefetch), then one guarded
update (:mod:`alignment.recipes.optim`) and the step's metrics reduced into one device vector.
Reading that vector is the step's only host sync, and its NaN/inf check; with
``overlap_steps`` it is read one step late (:class:`~alignment.recipes.pending.PendingStep`).
"""

from __future__ import annotations

import contextlib
import math
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from alignment.batching import to_device
from alignment.recipes.base import Recipe
from alignment.recipes.pending import PendingStep

__all__ = ["StepOutput", "SupervisedRecipe"]


@dataclass
class StepOutput:
    """What :meth:`SupervisedRecipe.compute_loss` returns for one micro-batch.

    ``loss`` is the differentiable mean over the micro-batch (the step divides by
    ``grad_accum``); ``metrics`` are detached scalar tensors (means over the micro-batch; kept
    as tensors so nothing synchronises with the GPU until the step ends); ``tokens`` counts
    non-padding tokens forwarded (for ``tokens_per_s``) and ``samples`` the examples (pairs for
    DPO and reward models).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    samples: int = 0


class SupervisedRecipe(Recipe):
    """A recipe whose step is accumulate-and-update over collated micro-batches; see the module docstring."""

    @abstractmethod
    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        """Loss and metrics of one collated micro-batch (already on ``self.device``)."""

    def sampler_batch_size(self) -> int:
        return self.config.batch_size

    def steps_per_epoch(self) -> int:
        return max(1, len(self.feed) // self.config.grad_accum)

    def optimizer_steps_per_step(self) -> int:
        return 1

    def overlaps_steps(self) -> bool:
        """Whether a step leaves its metrics pending until the next step is queued
        (``TrainSettings.overlap_steps``; None: on one CUDA device with a fused optimizer)."""
        choice = self.config.overlap_steps
        if choice is None:
            choice = self.device.type == "cuda"
        return bool(choice) and self._skips_on_device() and self.accelerator.num_processes == 1

    def train_step(self) -> dict[str, float] | PendingStep:
        """``grad_accum`` micro-batches (no DDP sync but on the last), one update.

        Returns means over micro-batches and processes of ``loss`` and the recipe metrics,
        ``grad_norm``, and the summed ``tokens`` and ``samples`` of all processes.
        """
        acc, accum = self.accelerator, self.config.grad_accum
        losses, outs = [], []
        for i in range(accum):
            batch = self.feed.next_batch(self.device)
            sync = contextlib.nullcontext() if i == accum - 1 else acc.no_sync(self.train_module)
            with sync:
                with acc.autocast():
                    out = self.compute_loss(batch)
                acc.backward(out.loss / accum)
            if self.step + 1 < self.total_steps:  # the backward is queued on the device; collate meanwhile
                self.feed.prefetch()
            losses.append(out.loss.detach().float())
            outs.append(out)
        losses = torch.stack(losses)
        # The update is skipped on the device when the loss or grad norm is not finite; the
        # check itself comes with the metrics (PendingStep.resolve), so the weights stay intact.
        norm = self.optimizer_step(losses, defer_check=True)
        keys = sorted(outs[0].metrics)
        means = [losses.mean()] + [torch.stack([o.metrics[k].float() for o in outs]).mean() for k in keys]
        means.append(norm.float())
        counts = torch.tensor([sum(o.tokens for o in outs), sum(o.samples for o in outs)], dtype=torch.float64)
        vec = torch.stack([m.to(self.device) for m in means])
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="mean")
            counts = acc.reduce(counts.to(self.device), reduction="sum")
        tokens, samples = counts.tolist()
        pending = PendingStep.start(self.step + 1, keys, vec, tokens, samples, copy_async=self.overlaps_steps())
        return pending if self.overlaps_steps() else pending.resolve()

    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        """Sample-weighted mean loss and recipe metrics over the eval set (sharded over processes)."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        acc, bs = self.accelerator, self.config.batch_size
        chunks = [list(range(i, min(i + bs, len(self.eval_set)))) for i in range(0, len(self.eval_set), bs)]
        mine = chunks[acc.process_index :: acc.num_processes]
        # Every process runs the same number of forwards (FSDP needs all ranks in each one).
        rounds = math.ceil(len(chunks) / acc.num_processes)
        sums: dict[str, torch.Tensor] = {}
        count = torch.zeros((), device=self.device)
        self.train_module.eval()
        try:
            for r in range(rounds):
                idx, weight = (mine[r], 1.0) if r < len(mine) else (chunks[0], 0.0)
                batch = to_device(self.eval_set.collate([self.eval_set[i] for i in idx]), self.device)
                with acc.autocast():
                    out = self.compute_loss(batch)
                n = out.samples * weight
                for k, v in {"loss": out.loss, **out.metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() * n
                count += n
        finally:
            self.train_module.train()
        keys = sorted(sums)
        vec = torch.stack([sums[k] for k in keys] + [count])
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="sum")
        values = vec.tolist()
        return {f"eval/{k}": v / max(values[-1], 1e-12) for k, v in zip(keys, values[:-1], strict=True)}
