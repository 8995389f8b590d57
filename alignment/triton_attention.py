"""One-token decode attention over a static cache as one Triton kernel (grouped-query aware).

Why: in a compiled CUDA-graph decode step the attention of each layer ran as four to five
kernels (the mask's expansion, ``q kᵀ``, the softmax, ``p v`` and a copy), each a few
microseconds of latency at batch 64 (benchmarks/RESULTS.md, runs 20–22: 0.29 ms of a 1.5 ms
0.5B step). :func:`gqa_decode` reads each K/V head once for all the query heads that share it,
applies the cache's validity mask as it reads (slots not yet filled, and left padding, are not
read at all: the torch path reads the whole static cache every step) and keeps the softmax online
(flash-decoding without the split: batch × kv-heads programs already fill the GPU at batch 64).

Math, per row ``b`` and query head ``h`` (K/V head ``h // G``, ``G = Hq / Hk``, transformers'
``repeat_kv`` order)::

    s_t = scale · q_h · k_t          for the slots t with valid[b, t], −inf elsewhere
    out_h = Σ_t softmax(s)_t · v_t    (scores, softmax and accumulation in fp32)

Same result as :func:`alignment.fast_generation.decode_attention` up to rounding: there the
scores pass through the compute dtype before the fp32 softmax; here they stay fp32.

Assumptions: CUDA tensors, one query position, ``D`` a power of two between 16 and 256, at least
one valid slot per row (the decoder marks each row's own slot valid). Importing this module
needs no GPU; :data:`AVAILABLE` is False where Triton is not installed (then nothing here runs).
``TRITON_INTERPRET=1`` runs the kernel on CPU tensors (the unit test does, where Triton is
installed).
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with torch's CUDA wheels, not with the CPU wheel
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - depends on the wheel
    triton = None

AVAILABLE = triton is not None
INTERPRETED = AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's interpreter runs the kernel on CPU tensors (numpy; fp32 and fp16, not bf16): tests only."""

__all__ = ["AVAILABLE", "INTERPRETED", "gqa_decode", "supported"]

BLOCK_T = 64  # cache slots per loop iteration


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """True when :func:`gqa_decode` runs on these tensors: a CUDA device (or the interpreter), one
    query position, a power-of-two head size."""
    D = query.shape[-1]
    return (AVAILABLE and (query.is_cuda or INTERPRETED) and query.shape[2] == 1 and D >= 16 and D <= 256 and D & (D - 1) == 0
            and query.shape[1] % key.shape[1] == 0)


if AVAILABLE:

    @triton.jit
    def _gqa_decode_kernel(Q, K, V, Valid, Out, scale,
                           sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, smb, smt, sob, soh, sod,
                           T: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                           BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // HK
        kv = pid % HK
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        rows = g < G
        heads = kv * G + g
        q = tl.load(Q + b * sqb + heads[:, None] * sqh + d[None, :] * sqd, mask=rows[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for start in range(0, T, BLOCK):
            t = start + tl.arange(0, BLOCK)
            seen = tl.load(Valid + b * smb + t * smt, mask=t < T, other=0) != 0
            # masked loads fetch no memory: only the filled, valid slots' K and V are read
            k = tl.load(K + b * skb + kv * skh + t[:, None] * skt + d[None, :] * skd, mask=seen[:, None], other=0.0)
            # inductor may pass the float as fp64: cast back, or the loop-carried m_i changes type
            s = (tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale).to(tl.float32)  # [BLOCK_G, BLOCK]
            s = tl.where(seen[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with nothing seen yet
            alpha = tl.exp(m_i - m_use)
            p = tl.exp(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + kv * svh + t[:, None] * svt + d[None, :] * svd, mask=seen[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(Out + b * sob + heads[:, None] * soh + d[None, :] * sod, acc.to(Out.dtype.element_ty), mask=rows[:, None])

    @triton_op("alignflow::gqa_decode", mutates_args={})
    def _gqa_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
                    scale: float) -> torch.Tensor:
        B, Hq, _, D = query.shape
        Hk, T = key.shape[1], key.shape[2]
        G = Hq // Hk
        out = torch.empty(B, 1, Hq, D, dtype=query.dtype, device=query.device)
        # under the interpreter nothing is compiled, and torch 2.11's wrap_triton refuses its functions
        launch = _gqa_decode_kernel if INTERPRETED else wrap_triton(_gqa_decode_kernel)
        launch[(B * Hk,)](
            query, key, value, valid, out, scale,
            query.stride(0), query.stride(1), query.stride(3), key.stride(0), key.stride(1), key.stride(2), key.stride(3),
            value.stride(0), value.stride(1), value.stride(2), value.stride(3), valid.stride(0), valid.stride(1),
            out.stride(0), out.stride(2), out.stride(3),
            T=T, HK=Hk, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), D=D, BLOCK=BLOCK_T,
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 models: no TF32 rounding
        )
        return out


def gqa_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
               scale: float) -> torch.Tensor:
    """Attention of one query per row over a cache; returns ``[B, 1, Hq, D]`` in ``query.dtype``.

    ``query`` ``[B, Hq, 1, D]``, ``key``/``value`` ``[B, Hk, T, D]``, ``valid`` boolean ``[B, T]``
    (True = the slot is attended); any strides. Raises RuntimeError when Triton is not installed;
    check :func:`supported` first.
    """
    if not AVAILABLE:
        raise RuntimeError("gqa_decode needs Triton (it ships with torch's CUDA wheels)")
    return _gqa_decode(query, key, value, valid, float(scale))
