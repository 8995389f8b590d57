"""The optimizer side of a recipe: AdamW with its lr schedule, and the guarded update.

:func:`guarded_step` is the one place an update is applied. The NaN/inf guard: a non-finite
loss or grad norm raises :class:`~alignment.logprobs.NonFiniteError` naming the step, and the
optimizer never applies that step, so the weights (in memory and on disk) are never poisoned.
With a fused optimizer (CUDA) the caller may defer the check: the finiteness flag goes to the
optimizer as ``found_inf`` (the kernel skips the update on the device) and the caller reads it
with the step's metrics, one host sync per step instead of three.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from alignment.config import OptimSettings
from alignment.logprobs import check_finite
from alignment.recipes.state import lr_lambda

__all__ = ["build_optimizer", "build_scheduler", "guarded_step", "skips_on_device"]


def build_optimizer(module: nn.Module, opt: OptimSettings, device: torch.device, owner: str,
                    own_lrs: dict[int, float] | None = None) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters; no weight decay on biases and norms (ndim < 2);
    fused on CUDA unless ``opt.fused`` says otherwise. ``own_lrs`` maps ``id(param)`` to a peak lr
    other than ``opt.lr`` (e.g. a critic's): those parameters get groups of their own, after the
    ``opt.lr`` groups (``param_groups[0]`` stays the main lr). Raises RuntimeError naming ``owner``
    when nothing is trainable."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{owner}: the model has no trainable parameters")
    own_lrs = own_lrs or {}
    groups = []
    for lr in [opt.lr, *sorted(set(own_lrs.values()) - {opt.lr})]:
        mine = [p for p in params if own_lrs.get(id(p), opt.lr) == lr]
        groups += [{"params": [p for p in mine if p.ndim >= 2], "weight_decay": opt.weight_decay, "lr": lr},
                   {"params": [p for p in mine if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
    fused = opt.fused if opt.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=fused or None
    )


def build_scheduler(optimizer: torch.optim.Optimizer, opt: OptimSettings,
                    optimizer_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup then constant/linear/cosine decay (to ``opt.min_lr_ratio``) over ``optimizer_steps`` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt.warmup_steps, optimizer_steps, opt.schedule,
                                                                  opt.min_lr_ratio))


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


def skips_on_device(optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> bool:
    """True when the optimizer takes a device-side ``found_inf`` flag (fused AdamW) and no loss
    scaler (fp16) owns that flag."""
    fused = bool(_inner(optimizer).defaults.get("fused"))
    return fused and accelerator.scaler is None


def guarded_step(accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 max_grad_norm: float | None, step: int, losses: torch.Tensor | None = None,
                 defer_check: bool = False) -> torch.Tensor:
    """Guard, clip, step optimizer and schedule, zero grads; returns the global grad norm.

    Raises NonFiniteError naming ``step`` when ``losses`` or the grad norm is NaN/inf; the
    optimizer has not stepped then. With ``defer_check`` and an optimizer that can skip on the
    device (:func:`skips_on_device`), nothing syncs here: the update is skipped on the device
    when either is non-finite, and the caller must check them itself.
    """
    deferred = defer_check and skips_on_device(optimizer, accelerator)
    if losses is not None and not deferred:
        check_finite("loss", losses, step)
    norm = accelerator.clip_grad_norm_(module.parameters(), max_grad_norm or float("inf"))
    if deferred:
        bad = ~torch.isfinite(norm.detach())
        if losses is not None:
            bad = bad | ~torch.isfinite(losses.detach()).all()
        _inner(optimizer).found_inf = bad.float().reshape(())
    else:
        check_finite("grad_norm", norm, step)
    optimizer.step()
    if deferred:
        del _inner(optimizer).found_inf  # a flag for this step only
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
