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

:func:`varlen_attention` is causal attention restricted to each packed sequence of a flattened
batch (``TrainSettings.varlen_attention``): no padding in the matrix products (packing) *and*
the causal flash kernel (no block-diagonal mask that would send SDPA to the slower masked
kernel). On CUDA it calls ``torch.nn.attention.varlen.varlen_attn``; elsewhere a per-sequence
SDPA loop with the same result (what the CPU tests check).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

log = logging.getLogger(__name__)

__all__ = ["VARLEN_ATTENTION", "attention_implementation", "compile_layers", "repeated_blocks", "sdpa_backends",
           "set_causal_padding", "set_varlen_attention", "usable_fast_paths", "varlen_attention"]

VARLEN_ATTENTION = "alignflow_varlen"


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


def usable_fast_paths(compile: bool, varlen: bool, device: torch.device | str,
                      compute_dtype: torch.dtype) -> tuple[bool, bool, list[str]]:
    """``(compile, varlen, notes)``: the GPU fast paths asked for that can work on ``device``.

    Why: ``compile`` on a CPU spends many minutes in inductor before the first step (and with
    varlen attention in fp32 it fails inside inductor), so a GPU config run on a CPU would sit
    silently; the varlen flash kernel needs CUDA and bf16/fp16 activations (``compute_dtype``:
    the autocast dtype, else the weights'). Each switch turned off gets one sentence in
    ``notes`` naming the field, for the caller to log. The config itself is not changed, so a
    checkpoint written on one device resumes on another.
    """
    notes = []
    on_cuda = torch.device(device).type == "cuda"
    if compile and not on_cuda:
        notes.append(f"compile: off on {torch.device(device).type} (a GPU fast path: compiling on a CPU takes "
                     "minutes before the first step and rarely pays off)")
        compile = False
    if varlen and not on_cuda:
        notes.append(f"varlen_attention: off on {torch.device(device).type} (a GPU fast path: packed rows use "
                     "the block-diagonal mask instead, same results)")
        varlen = False
    elif varlen and compute_dtype not in (torch.float16, torch.bfloat16):
        notes.append(f"varlen_attention: off (the flash kernel needs bf16 or fp16 and this run computes in "
                     f"{compute_dtype}; set precision: bf16 to use it)")
        varlen = False
    return compile, varlen, notes


def sdpa_backends(allow_cudnn: bool = False):
    """Context manager: scaled-dot-product attention may use flash, memory-efficient and math
    kernels, and cuDNN's only when ``allow_cudnn`` (see ``TrainSettings.cudnn_attention``: cuDNN
    plans a kernel per new sequence length, a cost every ragged batch pays again). A no-op
    without CUDA. The previous backend set is restored on exit."""
    if allow_cudnn or not torch.cuda.is_available():
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _set_switch(module: nn.Module, name: str, enabled: bool) -> int:
    """Set the fast-path switch ``name`` on every sub-module that has it (the decoder wrappers
    of :mod:`alignment.models`); returns how many."""
    found = [sub for sub in module.modules() if hasattr(sub, name)]
    for sub in found:
        setattr(sub, name, enabled)
    return len(found)


def set_causal_padding(module: nn.Module, enabled: bool) -> int:
    """Set ``causal_padding`` on every sub-module that has the switch; returns how many.
    See ``TrainSettings.causal_padding``."""
    return _set_switch(module, "causal_padding", enabled)


def set_varlen_attention(module: nn.Module, enabled: bool) -> int:
    """Set ``varlen_attention`` on every sub-module that has the switch; returns how many.
    See ``TrainSettings.varlen_attention``."""
    return _set_switch(module, "varlen_attention", enabled)


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """Use attention implementation ``name`` inside the block (the config's choice is restored after).

    A name transformers has no mask function for (ours) also makes it skip building a mask."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                     cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Causal attention within each sequence of one flattened packed row, as a transformers attention function.

    ``query`` ``[1, Hq, T, D]``, ``key``/``value`` ``[1, Hk, T, D]`` (``Hq = G * Hk``; query head
    ``h`` reads K/V head ``h // G``), ``cu_seq_lens_q`` int32 ``[S + 1]``: sequence ``i`` is tokens
    ``cu[i]:cu[i+1]`` (it must start at 0 and end at T; every token belongs to one sequence),
    ``max_length_q`` the longest. ``attention_mask`` is ignored (the sequences are the mask).
    Returns ``([1, T, Hq, D], None)``. Raises ValueError without ``cu_seq_lens_q`` (not a
    packed batch) or with dropout.
    """
    if cu_seq_lens_q is None:
        raise ValueError("varlen attention needs cu_seq_lens_q (a packed batch with varlen_attention on)")
    if dropout:
        raise ValueError("varlen attention has no dropout; set the model's attention_dropout to 0")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    k, v = k.to(q.dtype), v.to(q.dtype)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_length_q, scale)
    else:
        out = _varlen_by_sequence(q, k, v, cu_seq_lens_q, scale)
    return out[None], None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


@functools.cache
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen(q, k, v, cu, max_len, scale):
    # torch's varlen_attn changed its signature between releases (is_causal -> window_size,
    # enable_gqa added): pass what this version takes.
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    if torch.is_autocast_enabled("cuda"):  # a custom op: autocast does not cast its inputs as it does SDPA's
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"varlen flash attention needs bf16 or fp16 (got {q.dtype}): train with precision bf16")
    groups = q.shape[1] // k.shape[1]
    extra = {}
    if groups > 1 and "enable_gqa" in params:
        extra["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if "window_size" in params:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    if "scale" in params:
        extra["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("this torch's varlen_attn takes no scale; the model's attention scaling is not 1/sqrt(d)")
    cu = cu.to(torch.int32)
    return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, int(max_len), int(max_len), **extra)


def _varlen_by_sequence(q, k, v, cu, scale):
    groups = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, L, D]
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, 0), vs.repeat_interleave(groups, 0)
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out
