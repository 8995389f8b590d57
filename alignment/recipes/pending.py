"""One training step's metrics while they may still be on the device.

The default step ends with its metrics in one device vector (loss, recipe metrics, grad norm).
Reading it waits for the device to finish the step; with ``TrainSettings.overlap_steps`` the
recipe instead starts an asynchronous copy to pinned host memory and reads it one step later,
after the next step's work is queued, so the device never idles while the host catches up.
The NaN/inf verdict comes with the values: :meth:`PendingStep.resolve` raises
:class:`~alignment.logprobs.NonFiniteError` naming *this* step, whenever it is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignment.logprobs import check_finite

__all__ = ["PendingStep"]


@dataclass
class PendingStep:
    """Metrics of training step ``step``: ``values`` = [loss, *keys, grad_norm] (device, CPU or
    pinned host copy), ``event`` marks when an asynchronous copy is complete (None: no copy)."""

    step: int
    keys: list[str]
    values: torch.Tensor
    event: torch.cuda.Event | None
    tokens: float
    samples: float

    @classmethod
    def start(cls, step: int, keys: list[str], vec: torch.Tensor, tokens: float, samples: float,
              copy_async: bool) -> PendingStep:
        """Wrap ``vec``; with ``copy_async`` (CUDA only) queue its copy to pinned host memory now."""
        if copy_async and vec.is_cuda:
            host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
            host.copy_(vec.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return cls(step, keys, host, event, tokens, samples)
        return cls(step, keys, vec.detach(), None, tokens, samples)

    def resolve(self) -> dict[str, float]:
        """The metrics as floats (``loss``, recipe keys, ``grad_norm``, ``tokens``, ``samples``).

        Waits for the copy if there is one. Raises NonFiniteError naming ``step`` when the loss
        or the grad norm is NaN/inf.
        """
        if self.event is not None:
            self.event.synchronize()
        values = self.values.tolist()
        metrics = {"loss": values[0], **dict(zip(self.keys, values[1:-1], strict=True)), "grad_norm": values[-1]}
        for name in ("loss", "grad_norm"):
            check_finite(name, torch.tensor(metrics[name]), self.step)
        return {**metrics, "tokens": self.tokens, "samples": self.samples}
