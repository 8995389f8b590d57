"""Sampling a token per row from ``softmax(logits / T)`` as a Triton Gumbel-max kernel (CUDA).

Why: the compiled exponential race of :func:`alignment.generation.sample_next` (the ``fused``
branch) writes ``B × V`` fp32 Exp(1) variates in one kernel and reduces each row in one program of
another (64 programs for 132 SMs at batch 64): about 65–75 µs of an H100 decode step for
``[64, 128256..151936]`` logits. Here no noise is stored: each program draws the noise of its own
block of the vocabulary in registers (Philox, as ``tl.randint4x`` gives it) and keeps only the
block's best score, and many programs share each row.

Math, per row ``b``: the token is ::

    argmax_i  l_{b,i} / T + G_{b,i},     G = -log E,  E = -log U ~ Exp(1),  U uniform in (0, 1)

``G`` is Gumbel, so this is a draw from ``softmax(l_b / T)`` (the Gumbel-max trick; the race's
``argmax p_i / E_i`` is the same draw: ``log p_i - log E_i`` is ``l_i / T + G_i`` less a constant
of the row). Scores are fp32 whatever the logits' dtype (fp32, fp16, bf16).

The noise: one Philox4x32-10 call (Triton's ``randint4x``) gives four 32-bit words for four adjacent
tokens. ``W = (r + 1/2) / 2^32`` (clamped below 1 after the fp32 rounding) is uniform in
(0, 1) and ``E = -log(1 - W)``, by its series ``W + W²/2 + …`` below ``W = 1/16``: the small
``E`` that decide the winners (a large vocabulary's best Gumbel is ``log V`` ≈ 12, ``E`` ≈ 1e-5)
keep fp32's relative precision instead of the 2^-24 steps of ``-log U`` with ``U`` near 1. ``G``
lies in [-2.8, 22.9]: never infinite.

Kernels: stage 1, grid ``(B, cdiv(V, block))`` (``block`` 2048, 4 warps), writes each block's best
score and its token into ``[B, n_blocks]`` buffers; stage 2, one program (one warp) per row, picks
the best block's token and, in its first program, advances the counter. Ties go to the lowest index
(within a block and across blocks), as ``torch.argmax`` does. On an H100, in a CUDA graph of
back-to-back draws of bf16 logits: 38 µs a draw at ``[64, 151936]`` (the compiled race 130 µs, of
which 20 µs its noise), 32 µs at ``[64, 128256]`` (race 102), 8 µs at ``[8, 151936]`` (race 65).
That is ~250 G logits/s, bound by the arithmetic (Philox and two logs per logit), not by memory.

State: a ``[2]`` int64 device tensor ``(key, counter)`` (:func:`new_state`). The key (63 random
bits) is drawn once from the caller's ``torch.Generator`` on the device, with no host sync, so the
same generator seed gives the same tokens. The kernels read both with ``tl.load`` and each draw
adds ``B`` to the counter on the device, so a CUDA graph that captured a draw draws fresh noise on
every replay, exactly as eager calls would. Row ``b`` of a draw uses Philox counter
``(lane, counter + b)`` under the key: no two draws of one state share noise until the counter
passes 2^32 (67 million draws at batch 64).

Special values: ``-inf`` logits (suppressed tokens) never win while the row has a finite or
``+inf`` logit; a NaN logit is treated as ``-inf`` (never drawn); ``+inf`` logits win (the lowest
index among them). A row with no logit above ``-inf`` (all ``-inf`` or NaN) gets token 0, as the
race gives for such a row.

Assumptions: a 2-D ``[B, V]`` tensor with a unit stride along the vocabulary
(other strides are copied first), a finite temperature ``> 0``. :func:`gumbel_sample` raises
ValueError for anything else and RuntimeError where Triton is not installed; check
:func:`supported` first. Importing this module needs neither a GPU nor Triton (:data:`AVAILABLE`
is then False). ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (fp32 and fp16; the unit
test does, where Triton is installed).
"""

from __future__ import annotations

import math
import os

import torch

try:  # Triton ships with torch's CUDA wheels, not with the CPU wheel
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
    from triton.language.extra.cuda import libdevice
except ImportError:  # pragma: no cover - depends on the wheel
    triton = None

AVAILABLE = triton is not None
INTERPRETED = AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's interpreter runs the kernels on CPU tensors (numpy; fp32 and fp16, not bf16): tests only."""

__all__ = ["AVAILABLE", "BLOCK", "INTERPRETED", "GumbelSampler", "gumbel_sample", "new_state", "supported"]

BLOCK = 2048
"""Vocabulary entries per stage-1 program (one Philox call for four of them). With 4 warps the
fastest of 1024–8192 × 4–16 warps on an H100 at [64, 151936] and [64, 128256] bf16, within 8% of the
fastest at batch 8 and 256."""
NUM_WARPS = 4
_FAST_LOG = False
"""True: the kernel's two logs by libdevice's ``fast_logf`` (``lg2.approx``, absolute error ~2^-22:
the Gumbel noise moves by < 1e-6) instead of ``tl.log``; CUDA only (the interpreter has no
libdevice). Off until measured: the H100 figures below are with ``tl.log``."""
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supported(logits: torch.Tensor) -> bool:
    """True when :func:`gumbel_sample` runs on ``logits``: Triton installed, a CUDA tensor (or a CPU
    one under the interpreter, not bf16), ``[B, V]`` with ``B, V ≥ 1``, a float dtype."""
    if not (AVAILABLE and logits.dim() == 2 and logits.dtype in _DTYPES and logits.numel() > 0):
        return False
    return logits.is_cuda or (INTERPRETED and logits.device.type == "cpu" and logits.dtype != torch.bfloat16)


def new_state(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh ``[2]`` int64 state ``(key, counter = 0)`` on ``device``; the key is drawn from
    ``generator`` (on that device; None: the default one) without a host sync."""
    key = torch.randint(2**63 - 1, (1,), generator=generator, device=device, dtype=torch.int64)
    return torch.cat([key, torch.zeros(1, dtype=torch.int64, device=device)])


if AVAILABLE:

    @triton.jit
    def _log(x, FAST: tl.constexpr):
        if FAST:
            return libdevice.fast_logf(x)
        else:
            return tl.log(x)

    @triton.jit
    def _gumbel_block_kernel(Logits, State, BlockMax, BlockArg, inv_temperature, stride_b, V, NB,
                             BLOCK: tl.constexpr, FAST_LOG: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)
        key = tl.load(State)
        stream = tl.load(State + 1) + b  # int64: this row's Philox stream in this draw
        lane = j * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # the row's Philox lanes of this block
        r0, r1, r2, r3 = tl.randint4x(key, (stream << 32) + lane)  # counter words (lane, stream)
        # each lane's four words serve four adjacent columns (in the order r0, r2, r1, r3)
        bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK])
        cols = j * BLOCK + tl.arange(0, BLOCK)
        logit = tl.load(Logits + b.to(tl.int64) * stride_b + cols, mask=cols < V, other=float("-inf"))
        # W = (r + 1/2) / 2^32 in (0, 1); the largest r round to 1.0 in fp32: clamp to 1 - 2^-24
        w = tl.minimum(bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10, 0.99999994)
        series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * (0.25 + w * 0.2))))
        e = tl.where(w < 0.0625, series, -_log(1.0 - w, FAST_LOG))  # E = -log(1 - W) ~ Exp(1), > 0
        score = logit.to(tl.float32) * inv_temperature - _log(e, FAST_LOG)
        score = tl.where(score == score, score, float("-inf"))  # a NaN logit never wins
        best, arg = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(BlockMax + b * NB + j, best)
        tl.store(BlockArg + b * NB + j, j * BLOCK + arg)

    @triton.jit
    def _gumbel_pick_kernel(BlockMax, BlockArg, Tokens, State, B, NB, BLOCK_N: tl.constexpr):
        b = tl.program_id(0)
        n = tl.arange(0, BLOCK_N)
        scores = tl.load(BlockMax + b * NB + n, mask=n < NB, other=float("-inf"))
        _, j = tl.max(scores, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(Tokens + b, tl.load(BlockArg + b * NB + j).to(tl.int64))
        if b == 0:  # every stage-1 program has read the counter (same stream, earlier kernel)
            tl.store(State + 1, tl.load(State + 1) + B)

    @triton_op("alignflow::gumbel_sample", mutates_args={"state"})
    def _gumbel_sample(logits: torch.Tensor, state: torch.Tensor, inv_temperature: float, block: int,
                       num_warps: int) -> torch.Tensor:
        B, V = logits.shape
        NB = triton.cdiv(V, block)
        block_max = torch.empty(B, NB, dtype=torch.float32, device=logits.device)
        block_arg = torch.empty(B, NB, dtype=torch.int32, device=logits.device)
        tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
        # under the interpreter nothing is compiled, and torch 2.11's wrap_triton refuses its functions
        first = _gumbel_block_kernel if INTERPRETED else wrap_triton(_gumbel_block_kernel)
        second = _gumbel_pick_kernel if INTERPRETED else wrap_triton(_gumbel_pick_kernel)
        first[(B, NB)](logits, state, block_max, block_arg, inv_temperature, logits.stride(0), V, NB,
                       BLOCK=block, FAST_LOG=_FAST_LOG, num_warps=num_warps)
        second[(B,)](block_max, block_arg, tokens, state, B, NB, BLOCK_N=triton.next_power_of_2(NB), num_warps=1)
        return tokens


def gumbel_sample(logits: torch.Tensor, state: torch.Tensor, temperature: float, *, block: int = BLOCK,
                  num_warps: int = NUM_WARPS) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` from ``softmax(logits / temperature)``: ``[B]`` int64
    on the logits' device; adds ``B`` to ``state[1]`` (:func:`new_state`) on the device.

    ``block``: vocabulary entries per stage-1 program, a power of two ≥ 16. Raises ValueError for
    logits, a state, a temperature or a block it does not take, RuntimeError without Triton.
    """
    if not AVAILABLE:
        raise RuntimeError("gumbel_sample needs Triton (it ships with torch's CUDA wheels)")
    if not supported(logits):
        raise ValueError("gumbel_sample takes [B, V] float logits on a CUDA device, "
                         f"got {tuple(logits.shape)} {logits.dtype} on {logits.device}")
    if state.shape != (2,) or state.dtype != torch.int64 or state.device != logits.device:
        raise ValueError(f"state must be new_state()'s [2] int64 tensor on {logits.device}, "
                         f"got {tuple(state.shape)} {state.dtype} on {state.device}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if block < 16 or block & (block - 1) or logits.shape[1] > 65535 * block:  # the grid's second axis
        raise ValueError(f"block must be a power of two >= 16 with at most 65535 blocks a row, got {block}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _gumbel_sample(logits, state, 1.0 / float(temperature), int(block), int(num_warps))


class GumbelSampler:
    """:func:`gumbel_sample` with its own state, for one decode: ``sampler(logits, temperature)``.

    The key is drawn from ``generator`` (on ``device``) when the sampler is made; later draws take
    nothing from the generator, so capturing them in a CUDA graph needs no generator registration.
    Making one needs no Triton; calling it does.
    """

    def __init__(self, device: torch.device | str, generator: torch.Generator | None = None, *,
                 block: int = BLOCK, num_warps: int = NUM_WARPS) -> None:
        self.state = new_state(device, generator)
        self.block = block
        self.num_warps = num_warps

    def __call__(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return gumbel_sample(logits, self.state, temperature, block=self.block, num_warps=self.num_warps)
