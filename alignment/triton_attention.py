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

:func:`rope_write_decode` is the same kernel taking the step's query, key and value before the
rotary embedding: it rotates them (``(x₁, x₂) → (x₁ cos − x₂ sin, x₂ cos + x₁ sin)`` on the two
halves of a head), writes the key and value into the cache at the step's slot and attends, so a
layer's rotary kernel(s), the cache's position arithmetic and its two writes go too (RESULTS.md,
run 31: 338 → 248 kernels in a 0.5B step).

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

__all__ = ["AVAILABLE", "INTERPRETED", "gqa_decode", "rope_write_decode", "supported", "supports_update"]

BLOCK_T = 64  # cache slots per loop iteration


def supported(query: torch.Tensor, key: torch.Tensor) -> bool:
    """True when :func:`gqa_decode` runs on these tensors: a CUDA device (or the interpreter), one
    query position, a power-of-two head size."""
    D = query.shape[-1]
    return (AVAILABLE and (query.is_cuda or INTERPRETED) and query.shape[2] == 1 and D >= 16 and D <= 256 and D & (D - 1) == 0
            and query.shape[1] % key.shape[1] == 0)


def supports_update(query: torch.Tensor, key: torch.Tensor) -> bool:
    """True when :func:`rope_write_decode` runs: :func:`supported`, and half a head at least 16 wide
    (the kernel's matrix products take the rotary halves apart)."""
    return supported(query, key) and query.shape[-1] >= 32


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

    @triton.jit
    def _rope_write_decode_kernel(Q, K, V, Cos, Sin, KC, VC, Slot, Valid, Out, scale,
                                  sqb, sqh, sqd, skb, skh, skd, svb, svh, svd, scb, scd, ssb, ssd,
                                  sKb, sKh, sKt, sKd, sVb, sVh, sVt, sVd, smb, smt, sob, soh, sod,
                                  T: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                                  HALF: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // HK
        kv = pid % HK
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HALF)
        rows = g < G
        heads = kv * G + g
        slot = tl.load(Slot)
        # rotary embedding of this row's new key and of its G queries, each head as two halves:
        # (x1, x2) -> (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2), in fp32, rounded once like the compiled step
        c1 = tl.load(Cos + b * scb + d * scd).to(tl.float32)
        c2 = tl.load(Cos + b * scb + (d + HALF) * scd).to(tl.float32)
        s1 = tl.load(Sin + b * ssb + d * ssd).to(tl.float32)
        s2 = tl.load(Sin + b * ssb + (d + HALF) * ssd).to(tl.float32)
        qp = Q + b * sqb + heads[:, None] * sqh
        q1 = tl.load(qp + d[None, :] * sqd, mask=rows[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(qp + (d[None, :] + HALF) * sqd, mask=rows[:, None], other=0.0).to(tl.float32)
        cache_dtype = KC.dtype.element_ty
        qa = (q1 * c1[None, :] - q2 * s1[None, :]).to(Q.dtype.element_ty).to(cache_dtype)
        qb = (q2 * c2[None, :] + q1 * s2[None, :]).to(Q.dtype.element_ty).to(cache_dtype)
        k1 = tl.load(K + b * skb + kv * skh + d * skd).to(tl.float32)
        k2 = tl.load(K + b * skb + kv * skh + (d + HALF) * skd).to(tl.float32)
        ka = (k1 * c1 - k2 * s1).to(cache_dtype)
        kb = (k2 * c2 + k1 * s2).to(cache_dtype)
        va = tl.load(V + b * svb + kv * svh + d * svd).to(VC.dtype.element_ty)
        vb = tl.load(V + b * svb + kv * svh + (d + HALF) * svd).to(VC.dtype.element_ty)
        kslot = KC + b * sKb + kv * sKh + slot * sKt
        vslot = VC + b * sVb + kv * sVh + slot * sVt
        tl.store(kslot + d * sKd, ka)
        tl.store(kslot + (d + HALF) * sKd, kb)
        tl.store(vslot + d * sVd, va)
        tl.store(vslot + (d + HALF) * sVd, vb)
        # the new slot's own score starts the online softmax; the loop below never reads that slot,
        # so no program reads what it has just written
        m_i = ((tl.sum(qa.to(tl.float32) * ka.to(tl.float32)[None, :], 1)
                + tl.sum(qb.to(tl.float32) * kb.to(tl.float32)[None, :], 1)) * scale).to(tl.float32)
        l_i = tl.full([BLOCK_G], 1.0, tl.float32)
        acc_a = tl.zeros([BLOCK_G, HALF], tl.float32) + va.to(tl.float32)[None, :]
        acc_b = tl.zeros([BLOCK_G, HALF], tl.float32) + vb.to(tl.float32)[None, :]
        for start in range(0, T, BLOCK):
            t = start + tl.arange(0, BLOCK)
            seen = (tl.load(Valid + b * smb + t * smt, mask=t < T, other=0) != 0) & (t != slot)
            kp = KC + b * sKb + kv * sKh + t[:, None] * sKt
            k_a = tl.load(kp + d[None, :] * sKd, mask=seen[:, None], other=0.0)
            k_b = tl.load(kp + (d[None, :] + HALF) * sKd, mask=seen[:, None], other=0.0)
            s = tl.dot(qa, tl.trans(k_a), input_precision=PRECISION) + tl.dot(qb, tl.trans(k_b), input_precision=PRECISION)
            s = tl.where(seen[None, :], (s * scale).to(tl.float32), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: m_i holds the own slot's score
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vp = VC + b * sVb + kv * sVh + t[:, None] * sVt
            v_a = tl.load(vp + d[None, :] * sVd, mask=seen[:, None], other=0.0)
            v_b = tl.load(vp + (d[None, :] + HALF) * sVd, mask=seen[:, None], other=0.0)
            acc_a = acc_a * alpha[:, None] + tl.dot(p.to(v_a.dtype), v_a, input_precision=PRECISION)
            acc_b = acc_b * alpha[:, None] + tl.dot(p.to(v_b.dtype), v_b, input_precision=PRECISION)
            m_i = m_new
        op = Out + b * sob + heads[:, None] * soh
        tl.store(op + d[None, :] * sod, (acc_a / l_i[:, None]).to(Out.dtype.element_ty), mask=rows[:, None])
        tl.store(op + (d[None, :] + HALF) * sod, (acc_b / l_i[:, None]).to(Out.dtype.element_ty), mask=rows[:, None])

    @triton_op("alignflow::rope_write_decode", mutates_args={"key_cache", "value_cache"})
    def _rope_write_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot: torch.Tensor,
                           valid: torch.Tensor, scale: float) -> torch.Tensor:
        B, Hq, _, D = query.shape
        Hk, T = key_cache.shape[1], key_cache.shape[2]
        G = Hq // Hk
        out = torch.empty(B, 1, Hq, D, dtype=query.dtype, device=query.device)

        def row_stride(table):  # one table for the whole batch: every row reads it
            return table.stride(0) if table.shape[0] > 1 else 0

        launch = _rope_write_decode_kernel if INTERPRETED else wrap_triton(_rope_write_decode_kernel)
        launch[(B * Hk,)](
            query, key, value, cos, sin, key_cache, value_cache, slot, valid, out, scale,
            query.stride(0), query.stride(1), query.stride(3), key.stride(0), key.stride(1), key.stride(3),
            value.stride(0), value.stride(1), value.stride(3), row_stride(cos), cos.stride(-1), row_stride(sin), sin.stride(-1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), key_cache.stride(3),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), value_cache.stride(3),
            valid.stride(0), valid.stride(1), out.stride(0), out.stride(2), out.stride(3),
            T=T, HK=Hk, G=G, BLOCK_G=max(16, triton.next_power_of_2(G)), HALF=D // 2, BLOCK=BLOCK_T,
            PRECISION="ieee" if key_cache.dtype == torch.float32 else "tf32",
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


def rope_write_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot: torch.Tensor,
                      valid: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode step's rotary embedding, cache write and attention as one kernel; returns the
    attention ``[B, 1, Hq, D]`` in ``query.dtype`` and writes the new key and value into the caches.

    ``query`` ``[B, Hq, 1, D]``, ``key``/``value`` ``[B, Hk, 1, D]`` before the rotary embedding (the
    projections' output, any strides); ``cos``/``sin`` ``[B, 1, D]`` (transformers' Llama/Qwen2
    rotary tables, ``rotate_half`` convention); ``key_cache``/``value_cache`` ``[B, Hk, T, D]``
    (written at ``slot``, a one-element integer tensor on the device, in their dtype);
    ``valid`` boolean ``[B, T]``, True for the slots attended, ``slot`` included. Replaces, in a
    compiled CUDA-graph step, the rotary kernel(s), the cache's position bookkeeping and its two
    ``index_copy_`` writes, and :func:`gqa_decode`: per layer four to five kernels fewer.
    Same result as those steps up to rounding (the new slot's own score is taken from its rounded
    key in registers rather than read back). Raises RuntimeError when Triton is not installed;
    check :func:`supports_update` first.
    """
    if not AVAILABLE:
        raise RuntimeError("rope_write_decode needs Triton (it ships with torch's CUDA wheels)")
    return _rope_write_decode(query, key, value, cos, sin, key_cache, value_cache, slot, valid, float(scale))
