"""Training batches in checkpointable order, with one batch collated ahead.

:class:`BatchFeed` draws index batches from a seeded, length-grouped
:class:`~alignment.batching.LengthGroupedSampler` (sharded over processes) and collates them.
**Prefetch**: a step may collate its next batch while the device still runs queued work
(:meth:`prefetch`); :meth:`position` then reports the sampler position *before* that batch, so
a checkpoint taken meanwhile makes a resumed run collate the same batch again.
"""

from __future__ import annotations

from typing import Any

import torch

from alignment.batching import ExampleSet, LengthGroupedSampler, to_device

__all__ = ["BatchFeed"]


class BatchFeed:
    """Collated batches of ``data`` in the order of ``sampler``; see the module docstring."""

    def __init__(self, data: ExampleSet, sampler: LengthGroupedSampler) -> None:
        self.data = data
        self.sampler = sampler
        self._prefetched: tuple[dict[str, int], dict[str, Any]] | None = None

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        return len(self.sampler)

    def collate_next(self) -> dict[str, Any]:
        """The next batch, collated on the CPU (the prefetched one if there is one)."""
        if self._prefetched is not None:
            batch, self._prefetched = self._prefetched[1], None
            return batch
        return self.data.collate([self.data[i] for i in self.sampler.next_batch()])

    def next_batch(self, device: torch.device) -> dict[str, Any]:
        """The next batch, collated and on ``device``."""
        return to_device(self.collate_next(), device)

    def prefetch(self) -> None:
        """Collate the next batch now (no-op when one is already waiting)."""
        if self._prefetched is None:
            position = self.sampler.state_dict()
            self._prefetched = (position, self.collate_next())

    def position(self) -> dict[str, int]:
        """The data position to checkpoint: before a prefetched batch, which is not yet used."""
        return self._prefetched[0] if self._prefetched else self.sampler.state_dict()

    def load_position(self, position: dict[str, int]) -> None:
        """Restore a checkpointed position (a prefetched batch is dropped)."""
        self.sampler.load_state_dict(position)
        self._prefetched = None
