"""GPU fast paths for the trainers: regional ``torch.compile`` and the attention-kernel choice.

:func:`compile_layers` compiles each *repeated block* of a model (the decoder layers: every
``nn.ModuleList`` whose children all share one class) instead of the whole model. All layers
run the same code, so dynamo traces and inductor compiles one layer once and every layer reuses
it: compilation costs about one layer's worth instead of the whole network's, and the
embedding, final norm, mask building and loss stay eager (they are a small share of the time).
What compiling buys is fusion of the memory-bound element-wise work between the matrix
products (RMSNorm in fp32, rotary embeddings, SiLU * up, residual adds, autocast casts), which
in eager mode costs several full passes over the activations each.

It also switches on the compiled LM-head log-prob blocks of any sub-module that exposes a
``compiled_head`` attribute (:class:`alignment.models.CausalLMLogps`).

Shapes are compiled dynamic (``dynamic=True``): packed and padded batches change their width
every step and must not recompile. The recipes call this when ``TrainSettings.compile`` is on
(a GPU option: on CPU it works but the compile time rarely pays off).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["compile_layers", "repeated_blocks", "sdpa_backends", "set_causal_padding"]


def repeated_blocks(module: nn.Module) -> list[nn.ModuleList]:
    """The outermost ``nn.ModuleList`` s under ``module`` with at least two children of one class."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue  # inside a block already found (e.g. a list of experts in a layer)
        if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1:
            found.append((name, child))
    return [blocks for _, blocks in found]


def compile_layers(module: nn.Module, *, dynamic: bool = True) -> nn.Module:
    """Compile every repeated block of ``module`` in place and turn on compiled log-prob heads.

    Returns ``module`` itself, or ``torch.compile(module)`` when it has no repeated block (then
    the whole module is compiled, as a fallback). Safe to call once per module; parameters,
    state dicts and checkpoints are unchanged (``nn.Module.compile`` keeps the module).
    """
    blocks = repeated_blocks(module)
    for layers in blocks:
        for layer in layers:
            layer.compile(dynamic=dynamic)
    heads = 0
    for sub in module.modules():
        if hasattr(sub, "compiled_head"):
            sub.compiled_head = True
            heads += 1
    log.info("compiled %d repeated block list(s) (%d layers) and %d log-prob head(s)", len(blocks),
             sum(len(b) for b in blocks), heads)
    if not blocks:
        return torch.compile(module, dynamic=dynamic)
    return module


def sdpa_backends(allow_cudnn: bool = False):
    """Context manager: scaled-dot-product attention may use flash, memory-efficient and math
    kernels, and cuDNN's only when ``allow_cudnn`` (see ``TrainSettings.cudnn_attention``: cuDNN
    plans a kernel per new sequence length, a cost every ragged batch pays again). A no-op
    without CUDA. The previous backend set is restored on exit."""
    if allow_cudnn or not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def set_causal_padding(module: nn.Module, enabled: bool) -> int:
    """Set ``causal_padding`` on every sub-module that has the switch (the decoder wrappers of
    :mod:`alignment.models`); returns how many. See ``TrainSettings.causal_padding``."""
    found = [sub for sub in module.modules() if hasattr(sub, "causal_padding")]
    for sub in found:
        sub.causal_padding = enabled
    return len(found)
