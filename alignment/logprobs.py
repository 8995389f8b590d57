"""Label log-probabilities without a full-vocabulary fp32 log-softmax, and a NaN/inf guard.

Conventions
-----------
* **Per-token functions are aligned**: position ``t`` of ``logits`` (or ``hidden``) scores
  ``labels[..., t]``. :func:`selective_log_softmax` and :func:`logps_from_hidden` do *not*
  shift. For a causal LM, the logits at position t predict token t+1, so a caller scoring
  ``input_ids`` passes ``logits[:, :-1]`` with ``input_ids[:, 1:]`` (see :func:`causal_shift`).
* **Sequence functions take Hugging Face labels**: :func:`sequence_logps` takes ``labels``
  aligned with ``input_ids`` exactly as ``model(input_ids, labels=...)`` does and shifts inside.
* **Padding**: a label equal to ``ignore_index`` (-100) or a 0 in ``mask`` excludes a
  position; excluded positions get log-prob 0 and no gradient.
* Results are fp32 whatever the logits dtype (float64 inputs stay float64). Work is split into blocks of about
  ``chunk_size`` tokens, so the fp32 buffer is ``chunk_size x V`` at most; the backward pass
  recomputes each block's softmax instead of storing it (custom autograd functions).
"""

from __future__ import annotations

import torch

__all__ = [
    "IGNORE_INDEX",
    "NonFiniteError",
    "check_finite",
    "causal_shift",
    "selective_log_softmax",
    "sequence_logps",
    "logps_from_hidden",
]

IGNORE_INDEX = -100


class NonFiniteError(FloatingPointError):
    """A loss or statistic became NaN or infinite; ``name`` and ``step`` say which and when."""

    def __init__(self, name: str, step: int | None, message: str) -> None:
        super().__init__(message)
        self.name = name
        self.step = step


def check_finite(name: str, tensor: torch.Tensor, step: int | None) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` and ``step`` if any value is NaN or inf.

    Synchronises with the device (one boolean read); call it once per step on the loss.
    """
    finite = torch.isfinite(tensor.detach())
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    raise NonFiniteError(
        name,
        step,
        f"non-finite {name} at step {step}: {bad} of {tensor.numel()} values are NaN or inf "
        "(lower the learning rate, check the data, or use fp32)",
    )


def causal_shift(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Align causal-LM outputs with their targets: ``logits[:, :-1]``, ``labels[:, 1:]``, ``mask[:, 1:]``."""
    return logits[:, :-1], labels[:, 1:], None if mask is None else mask[:, 1:]


def _blocks(batch: int, length: int, chunk_size: int):
    """(b0, b1, t0, t1) blocks of about ``chunk_size`` tokens over a [batch, length] grid."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if length >= chunk_size:
        for b in range(batch):
            for t in range(0, length, chunk_size):
                yield b, b + 1, t, min(t + chunk_size, length)
    else:
        rows = max(1, chunk_size // max(length, 1))
        for b in range(0, batch, rows):
            yield b, min(b + rows, batch), 0, length


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half types; float64 stays float64 (gradcheck, references)."""
    return x if x.dtype == torch.float64 else x.float()


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``x / temperature``, without a pass over ``x`` at temperature 1 (the training case)."""
    return x if temperature == 1.0 else x / temperature


def _as_3d(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims [..., T, V], got shape {tuple(x.shape)}")
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, *x.shape[-2:])


class _LabelLogProb(torch.autograd.Function):
    """log softmax(logits / temp)[label] over blocks; logits [B, T, V], labels [B, T] (all valid)."""

    @staticmethod
    def forward(ctx, logits, labels, chunk_size, temperature):
        B, T, _ = logits.shape
        out = torch.empty(B, T, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        lse = torch.empty_like(out)
        for b0, b1, t0, t1 in _blocks(B, T, chunk_size):
            block = _scaled(_upcast(logits[b0:b1, t0:t1]), temperature)
            lse_b = torch.logsumexp(block, dim=-1)
            lse[b0:b1, t0:t1] = lse_b
            out[b0:b1, t0:t1] = block.gather(-1, labels[b0:b1, t0:t1, None]).squeeze(-1) - lse_b
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse = ctx.saved_tensors
        temp = ctx.temperature
        grad = torch.empty_like(logits)
        B, T, _ = logits.shape
        for b0, b1, t0, t1 in _blocks(B, T, ctx.chunk_size):
            g = grad_out[b0:b1, t0:t1, None]
            # (onehot - softmax) * g / temp, in place on one fresh [block, V] buffer.
            block = (_scaled(_upcast(logits[b0:b1, t0:t1]), temp) - lse[b0:b1, t0:t1, None]).exp_().mul_(-g)
            block.scatter_add_(-1, labels[b0:b1, t0:t1, None], g)
            grad[b0:b1, t0:t1] = _scaled(block, temp)
        return grad, None, None, None


def _valid_labels(labels: torch.Tensor, mask: torch.Tensor | None, ignore_index: int):
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.bool()
    return valid, labels.masked_fill(~valid, 0)


def selective_log_softmax(
    logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """log softmax(logits / temperature)[..., label] per position, fp32, aligned (no shift).

    ``logits`` is ``[..., T, V]`` (any float dtype, may be a non-contiguous slice), ``labels``
    ``[..., T]``. Positions whose label is ``ignore_index`` return 0 and get no gradient.
    Equal to ``log_softmax(logits.float() / temperature, -1).gather(-1, labels)`` but the fp32
    buffer never exceeds about ``chunk_size`` positions.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    valid, safe = _valid_labels(labels, None, ignore_index)
    lead = labels.shape
    flat_labels = safe.reshape(-1, labels.shape[-1])
    out = _LabelLogProb.apply(_as_3d(logits, "logits"), flat_labels, chunk_size, float(temperature))
    return out.reshape(lead) * valid


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int = 1024,
    average: bool = False,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed (or, with ``average``, mean) log-prob of each sequence's labelled tokens, fp32 ``[B]``.

    ``logits`` ``[B, T, V]`` are the model outputs for ``input_ids`` ``[B, T]``; ``labels``
    ``[B, T]`` are aligned with ``input_ids`` (Hugging Face convention: -100 on prompt and
    padding) and ``mask`` ``[B, T]`` (optional) is aligned with them too. The causal shift
    happens here. A row with no labelled token gets 0 (sum and average).
    """
    logits, labels, mask = causal_shift(logits, labels, mask)
    valid, safe = _valid_labels(labels, mask, ignore_index)
    tok = selective_log_softmax(logits, safe, chunk_size, temperature=temperature) * valid
    total = tok.sum(-1)
    if average:
        return total / valid.sum(-1).clamp_min(1).to(total.dtype)
    return total


def _head_block_logps(h, weight, bias, labels, temperature):
    """One block's (label log-prob, logsumexp), fp32 ``[...]``, from hidden ``h`` ``[..., H]``."""
    logits = _upcast(torch.nn.functional.linear(h, weight, bias)) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse, lse


def _head_block_dlogits(h, weight, bias, labels, lse, g, temperature):
    """d(sum g * label log-prob)/d logits = (onehot(label) - softmax) * g / temperature, in the logits dtype."""
    logits = torch.nn.functional.linear(h, weight, bias)
    probs = torch.exp(_upcast(logits) / temperature - lse.unsqueeze(-1))
    hot = labels.unsqueeze(-1) == torch.arange(logits.shape[-1], device=logits.device)
    return ((hot.to(probs.dtype) - probs) * (g / temperature).unsqueeze(-1)).to(logits.dtype)


_COMPILED_BLOCKS: dict = {}


def _compiled(fn):
    """``torch.compile`` of a block function, built once per process (dynamic block sizes): the
    head matmul stays a library GEMM and the fp32 softmax work around it fuses into one kernel."""
    if fn not in _COMPILED_BLOCKS:
        _COMPILED_BLOCKS[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED_BLOCKS[fn]


class _HiddenLabelLogProb(torch.autograd.Function):
    """Label log-probs straight from hidden states; logits exist one block at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, temperature, compiled=False):
        B, T, _ = hidden.shape
        out = torch.empty(B, T, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        lse = torch.empty_like(out)
        fused = _compiled(_head_block_logps) if compiled else None
        for b0, b1, t0, t1 in _blocks(B, T, chunk_size):
            if fused is not None:
                out[b0:b1, t0:t1], lse[b0:b1, t0:t1] = fused(
                    hidden[b0:b1, t0:t1], weight, bias, labels[b0:b1, t0:t1], temperature)
                continue
            block = _scaled(_upcast(torch.nn.functional.linear(hidden[b0:b1, t0:t1], weight, bias)), temperature)
            lse_b = torch.logsumexp(block, dim=-1)
            lse[b0:b1, t0:t1] = lse_b
            out[b0:b1, t0:t1] = block.gather(-1, labels[b0:b1, t0:t1, None]).squeeze(-1) - lse_b
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.temperature, ctx.compiled = chunk_size, temperature, compiled
        dev = hidden.device.type
        # Replay the forward's autocast state in backward so the recomputed logits match.
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        temp = ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        dev, enabled, dtype = ctx.autocast
        B, T, _ = hidden.shape
        fused = _compiled(_head_block_dlogits) if ctx.compiled else None
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            for b0, b1, t0, t1 in _blocks(B, T, ctx.chunk_size):
                h = hidden[b0:b1, t0:t1]
                if fused is not None:
                    dlogits = fused(h, weight, bias, labels[b0:b1, t0:t1], lse[b0:b1, t0:t1],
                                    grad_out[b0:b1, t0:t1], temp)
                else:
                    logits = torch.nn.functional.linear(h, weight, bias)
                    g = grad_out[b0:b1, t0:t1, None]
                    # (onehot - softmax) * g / temp, in place on the block's fresh logits buffer
                    # (or its fp32 copy): each full-vocab pass costs as much as a small matmul.
                    dlogits = _scaled(_upcast(logits), temp).sub_(lse[b0:b1, t0:t1, None]).exp_().mul_(-g)
                    dlogits.scatter_add_(-1, labels[b0:b1, t0:t1, None], g)
                    dlogits = _scaled(dlogits, temp).to(logits.dtype)
                if need_h:
                    grad_h[b0:b1, t0:t1] = dlogits @ weight.to(dlogits.dtype)
                if need_w:
                    flat_g = dlogits.reshape(-1, dlogits.shape[-1])
                    grad_w += (flat_g.transpose(0, 1) @ h.reshape(-1, h.shape[-1]).to(flat_g.dtype)).to(acc)
                if need_b:
                    grad_b += dlogits.to(acc).sum(dim=(0, 1))
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def logps_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    chunk_size: int = 1024,
    *,
    lm_head_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    compiled: bool = False,
) -> torch.Tensor:
    """Per-token label log-probs from final hidden states, applying the LM head block by block.

    ``hidden`` ``[B, T, H]`` (the last hidden state after the final norm), ``lm_head_weight``
    ``[V, H]`` (and optional bias ``[V]``), ``labels``/``mask`` ``[B, T]``, **aligned** (pass
    ``hidden[:, :-1]`` with ``input_ids[:, 1:]`` for a causal LM). The full ``[B, T, V]`` logits
    never exist, in the forward or the backward pass (the backward recomputes each block's
    logits: one extra head matmul traded for B*T*V of memory). Gradients flow to ``hidden`` and,
    when they require it, to the head weight and bias.

    Assumes a plain linear head: models that scale or soft-cap logits (e.g. Gemma 2's
    ``final_logit_softcapping``) need :func:`selective_log_softmax` on real logits instead.
    Returns fp32 ``[B, T]`` with 0 at excluded positions.

    ``compiled=True`` (a GPU fast path) runs each block through ``torch.compile``-d functions of
    the same math, fusing the fp32 softmax passes over ``[block, V]`` into one kernel per
    direction; the first call pays the compilation.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [B, T, H] aligned with labels {tuple(labels.shape)}")
    valid, safe = _valid_labels(labels, mask, ignore_index)
    out = _HiddenLabelLogProb.apply(hidden, lm_head_weight, lm_head_bias, safe, chunk_size, float(temperature),
                                    compiled)
    return out * valid
