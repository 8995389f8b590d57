"""A decode step's decoder layers as one persistent Triton kernel (Llama and Qwen2 layers).

Why: at batch 64 a 0.5B decode step was 248 kernels, about ten a layer, each at its latency floor
(about 4 µs for a 2 MB projection whichever library runs it; benchmarks/RESULTS.md, runs 31–32):
30% of the memory-bandwidth bound. Here one launch runs every layer of the step. Its programs
(one per SM) walk the layers' five stages and meet at a grid barrier after each; nothing is
launched between them, so a stage's first loads start as soon as the barrier opens.

Stages of layer ``l`` (``x`` the residual stream ``[B, H]``, ``n(x) = g ⊙ x / rms(x)`` the RMSNorm):

0. ``qkv = n₁(x) Wqkvᵀ (+ b)``, tiles of ``BN_QKV`` output columns;
1. per (row, K/V head): the rotary embedding of the new query and key, the key and value written
   into the cache at the step's slot, attention over the row's valid slots (online softmax, fp32;
   :func:`alignment.triton_attention.rope_write_decode`'s math);
2. ``x ← x + attn Woᵀ``, tiles of ``BN_O`` columns;
3. ``h = silu(n₂(x) Wgᵀ) ⊙ (n₂(x) Wuᵀ)``, tiles of ``BN_GU`` columns of both;
4. ``x ← x + h Wdᵀ``, tiles of ``BN_DOWN`` columns, each split ``SPLIT_K`` ways over the inner
   dimension; the last program of a tile to arrive (a counter with acquire–release order) adds
   the partial sums in split order (the same bits every run) and updates ``x``.

The RMSNorm's sums of squares come from the stage that wrote ``x`` (each tile's share, summed by
the reader in tile order), so no stage reads ``x`` twice. Rounding follows the eager bf16 layer:
each projection's output, the norm's two products, the SiLU, the gate product and each residual
sum are rounded to their tensor's dtype (under autocast: fp32 residual stream, compute-dtype
matmuls), so the logits equal transformers' up to accumulation order.

Assumptions: CUDA (or Triton's interpreter), ``B <= 64`` rows, transformers' Llama/Qwen2 decoder
layers with plain linear projections (q/k/v bias allowed, none elsewhere), RMSNorm, SiLU, full
attention, a power-of-two head size of at least 32, and every SM free for the kernel's programs
(the grid barrier needs them all resident; a program that waits longer than ``SPIN_LIMIT`` polls
gives up and sets :attr:`TritonLayers.failed`, so a starved launch yields wrong logits and an
error, never a hang). Under the interpreter (programs run one after another) each stage is its own
launch: the same code without the barrier, which is what the CPU tests check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignment.triton_attention import AVAILABLE, INTERPRETED

if AVAILABLE:
    import triton
    import triton.language as tl

__all__ = ["TritonLayers", "unsupported_reason"]

STAGES = 5
MAX_ROWS = 64
SPIN_LIMIT = 1 << 22  # polls of the barrier counter (seconds of waiting) before a program gives up
LAYER_CLASSES = {"LlamaDecoderLayer", "Qwen2DecoderLayer"}
NORM_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm"}


def _inner(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "module", inner)


def unsupported_reason(model, batch: int, device: torch.device) -> str | None:
    """Why :class:`TritonLayers` cannot decode ``model`` at ``batch`` rows on ``device``; None when it can.
    The model's structure is checked first, so the reason names it on any machine."""
    top = _inner(model)
    body, head = getattr(top, "model", None), getattr(top, "lm_head", None)
    if body is None or type(head) is not nn.Linear or head.bias is not None:
        return "not a transformers decoder with a plain LM head"
    if not all(hasattr(body, a) for a in ("embed_tokens", "norm", "rotary_emb", "layers")):
        return "no embed_tokens/norm/rotary_emb/layers"
    config = top.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act}"
    for layer in body.layers:
        if type(layer).__name__ not in LAYER_CLASSES:
            return f"layer class {type(layer).__name__}"
        attn, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n).__name__ not in NORM_CLASSES for n in norms):
            return "not an RMSNorm"
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear for m in linears):
            return "a projection that is not a plain nn.Linear (LoRA, quantized)"
        if any(m.bias is not None for m in linears[3:]):
            return "a bias outside q/k/v"
        if len({m.bias is None for m in linears[:3]}) > 1:
            return "q/k/v biases on some projections only"
    D = body.layers[0].self_attn.head_dim
    if D < 32 or D & (D - 1):
        return f"head size {D} (a power of two >= 32 runs)"
    if batch > MAX_ROWS:
        return f"batch {batch} > {MAX_ROWS}"
    if not AVAILABLE:
        return "Triton is not installed"
    if device.type != "cuda" and not INTERPRETED:
        return "not a CUDA device"
    return None


if AVAILABLE:
    _SPIN_LIMIT = tl.constexpr(SPIN_LIMIT)

    @triton.jit
    def _grid_sync(Sync, target):
        """Wait until ``target`` arrivals: every program's writes before it are visible after it."""
        tl.debug_barrier()
        tl.atomic_add(Sync, 1, sem="release", scope="gpu")
        seen = tl.atomic_add(Sync, 0, sem="acquire", scope="gpu")
        polls = 0
        while (seen < target) & (polls < _SPIN_LIMIT):
            seen = tl.atomic_add(Sync, 0, sem="acquire", scope="gpu")
            polls += 1
        if seen < target:
            tl.store(Sync + 1, 1)  # the failure flag; the host raises
        tl.debug_barrier()

    @triton.jit
    def _prefetch_l2(Base, NBYTES: tl.constexpr, pid, P: tl.constexpr):
        """Ask L2 for this program's share of ``NBYTES`` bytes from ``Base`` (no registers, no wait):
        the next stages' weights stream in while this stage computes and waits at its barrier."""
        LINES: tl.constexpr = 256  # 128-byte lines per instruction batch
        STEP: tl.constexpr = 128 * LINES
        CHUNK: tl.constexpr = ((NBYTES + P - 1) // P + STEP - 1) // STEP * STEP
        base = Base.to(tl.pointer_type(tl.int8))
        for i in range(CHUNK // STEP):
            offs = pid.to(tl.int64) * CHUNK + i * STEP + tl.arange(0, LINES).to(tl.int64) * 128
            tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n mov.u32 $0, 0;", "=r,l",
                                      [base + tl.minimum(offs, NBYTES - 1)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _row_rstd(X, SS, FROM_X, rows, rmask, eps, H: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                  NPART: tl.constexpr, NP: tl.constexpr):
        """1 / rms of each row of ``X``: from the writers' per-tile sums of squares (``SS[p, row]``,
        summed in tile order), or from ``X`` itself (the first layer)."""
        if FROM_X:
            ss = tl.zeros([BM], tl.float32)
            for k0 in range(0, H, BK):
                kk = k0 + tl.arange(0, BK)
                x = tl.load(X + rows[:, None] * H + kk[None, :], mask=rmask[:, None] & (kk < H)[None, :], other=0.0,
                            cache_modifier=".cg").to(tl.float32)
                ss += tl.sum(x * x, 1)
        else:
            p = tl.arange(0, NP)
            part = tl.load(SS + p[:, None] * BM + rows[None, :], mask=(p < NPART)[:, None], other=0.0,
                           cache_modifier=".cg")
            ss = tl.sum(part, 0)
        return tl.rsqrt(ss / H + eps)

    @triton.jit
    def _normed(X, LN, rows, rmask, kk, rstd, H: tl.constexpr, CDT: tl.constexpr):
        """A ``[BM, BK]`` block of ``g ⊙ x / rms(x)`` as the eager RMSNorm rounds it, in the compute dtype."""
        XDT: tl.constexpr = X.dtype.element_ty
        km = kk < H
        x = tl.load(X + rows[:, None] * H + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0,
                    cache_modifier=".cg").to(tl.float32)
        g = tl.load(LN + kk, mask=km, other=0.0).to(tl.float32)
        return ((x * rstd[:, None]).to(XDT).to(tl.float32) * g[None, :]).to(XDT).to(CDT)

    @triton.jit(noinline=True)
    def _stage_qkv(X, SS, FROM_X, LN, W, Bias, QKV, B, pid, eps,
                   H: tl.constexpr, NQKV: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, NPART: tl.constexpr, NP: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr):
        CDT: tl.constexpr = W.dtype.element_ty
        TILES: tl.constexpr = (NQKV + BN - 1) // BN
        rows = tl.arange(0, BM)
        rmask = rows < B
        if pid < TILES:
            rstd = _row_rstd(X, SS, FROM_X, rows, rmask, eps, H, BM, BK, NPART, NP)
            for i in range((TILES + P - 1) // P):
                tile = pid + i * P
                if tile < TILES:
                    cols = tile * BN + tl.arange(0, BN)
                    cmask = cols < NQKV
                    acc = tl.zeros([BM, BN], tl.float32)
                    for k0 in range(0, H, BK):
                        kk = k0 + tl.arange(0, BK)
                        xn = _normed(X, LN, rows, rmask, kk, rstd, H, CDT)
                        w = tl.load(W + cols[:, None] * H + kk[None, :], mask=cmask[:, None] & (kk < H)[None, :],
                                    other=0.0)
                        acc += tl.dot(xn, tl.trans(w), input_precision=PRECISION)
                    if HAS_BIAS:
                        acc += tl.load(Bias + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                    tl.store(QKV + rows[:, None] * NQKV + cols[None, :], acc.to(CDT),
                             mask=rmask[:, None] & cmask[None, :])

    @triton.jit(noinline=True)
    def _stage_attention(QKV, Cos, Sin, Pos, KC, VC, Slot, Valid, ATT, B, pid, scale, sKb, sKh, sKt, smb,
                         T: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                         HALF: tl.constexpr, BLOCK: tl.constexpr, BM: tl.constexpr, P: tl.constexpr,
                         PRECISION: tl.constexpr):
        D: tl.constexpr = 2 * HALF
        NQKV: tl.constexpr = (HQ + 2 * HK) * D
        CDT: tl.constexpr = KC.dtype.element_ty
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HALF)
        rows = g < G
        slot = tl.load(Slot)
        for i in range((BM * HK + P - 1) // P):
            item = pid + i * P
            if item < B * HK:
                b = item // HK
                kv = item % HK
                heads = kv * G + g
                pos = tl.load(Pos + b)  # the rotary tables' row: this token's position
                c1 = tl.load(Cos + pos * D + d).to(tl.float32)
                c2 = tl.load(Cos + pos * D + d + HALF).to(tl.float32)
                s1 = tl.load(Sin + pos * D + d).to(tl.float32)
                s2 = tl.load(Sin + pos * D + d + HALF).to(tl.float32)
                qp = QKV + b * NQKV + heads[:, None] * D
                q1 = tl.load(qp + d[None, :], mask=rows[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
                q2 = tl.load(qp + d[None, :] + HALF, mask=rows[:, None], other=0.0,
                             cache_modifier=".cg").to(tl.float32)
                qa = (q1 * c1[None, :] - q2 * s1[None, :]).to(CDT)
                qb = (q2 * c2[None, :] + q1 * s2[None, :]).to(CDT)
                kp = QKV + b * NQKV + HQ * D + kv * D
                k1 = tl.load(kp + d, cache_modifier=".cg").to(tl.float32)
                k2 = tl.load(kp + d + HALF, cache_modifier=".cg").to(tl.float32)
                ka = (k1 * c1 - k2 * s1).to(CDT)
                kb = (k2 * c2 + k1 * s2).to(CDT)
                vp = QKV + b * NQKV + (HQ + HK) * D + kv * D
                va = tl.load(vp + d, cache_modifier=".cg")
                vb = tl.load(vp + d + HALF, cache_modifier=".cg")
                base = b * sKb + kv * sKh
                tl.store(KC + base + slot * sKt + d, ka)
                tl.store(KC + base + slot * sKt + d + HALF, kb)
                tl.store(VC + base + slot * sKt + d, va)
                tl.store(VC + base + slot * sKt + d + HALF, vb)
                # the new slot's own score starts the online softmax; the loop skips that slot
                m_i = ((tl.sum(qa.to(tl.float32) * ka.to(tl.float32)[None, :], 1)
                        + tl.sum(qb.to(tl.float32) * kb.to(tl.float32)[None, :], 1)) * scale).to(tl.float32)
                l_i = tl.full([BLOCK_G], 1.0, tl.float32)
                acc_a = tl.zeros([BLOCK_G, HALF], tl.float32) + va.to(tl.float32)[None, :]
                acc_b = tl.zeros([BLOCK_G, HALF], tl.float32) + vb.to(tl.float32)[None, :]
                for start in range(0, T, BLOCK):
                    t = start + tl.arange(0, BLOCK)
                    seen = (tl.load(Valid + b * smb + t, mask=t < T, other=0) != 0) & (t != slot)
                    kt = KC + base + t[:, None] * sKt
                    k_a = tl.load(kt + d[None, :], mask=seen[:, None], other=0.0)
                    k_b = tl.load(kt + d[None, :] + HALF, mask=seen[:, None], other=0.0)
                    s = (tl.dot(qa, tl.trans(k_a), input_precision=PRECISION)
                         + tl.dot(qb, tl.trans(k_b), input_precision=PRECISION))
                    s = tl.where(seen[None, :], (s * scale).to(tl.float32), float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, 1)
                    vt = VC + base + t[:, None] * sKt
                    v_a = tl.load(vt + d[None, :], mask=seen[:, None], other=0.0)
                    v_b = tl.load(vt + d[None, :] + HALF, mask=seen[:, None], other=0.0)
                    acc_a = acc_a * alpha[:, None] + tl.dot(p.to(CDT), v_a, input_precision=PRECISION)
                    acc_b = acc_b * alpha[:, None] + tl.dot(p.to(CDT), v_b, input_precision=PRECISION)
                    m_i = m_new
                op = ATT + b * (HQ * D) + heads[:, None] * D
                tl.store(op + d[None, :], (acc_a / l_i[:, None]).to(CDT), mask=rows[:, None])
                tl.store(op + d[None, :] + HALF, (acc_b / l_i[:, None]).to(CDT), mask=rows[:, None])

    @triton.jit
    def _residual_store(X, SS, tile, acc, rows, rmask, cols, cmask, H: tl.constexpr, BM: tl.constexpr,
                        CDT: tl.constexpr):
        """``x ← x + round(acc)`` on a column tile, and the tile's share of each row's sum of squares."""
        XDT: tl.constexpr = X.dtype.element_ty
        m = rmask[:, None] & cmask[None, :]
        ptr = X + rows[:, None] * H + cols[None, :]
        x = tl.load(ptr, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        new = (x + acc.to(CDT).to(tl.float32)).to(XDT)
        tl.store(ptr, new, mask=m)
        f = tl.where(m, new.to(tl.float32), 0.0)
        tl.store(SS + tile * BM + rows, tl.sum(f * f, 1))

    @triton.jit(noinline=True)
    def _stage_o(ATT, W, X, SS, B, pid, H: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr):
        CDT: tl.constexpr = W.dtype.element_ty
        TILES: tl.constexpr = (H + BN - 1) // BN
        rows = tl.arange(0, BM)
        rmask = rows < B
        for i in range((TILES + P - 1) // P):
            tile = pid + i * P
            if tile < TILES:
                cols = tile * BN + tl.arange(0, BN)
                cmask = cols < H
                acc = tl.zeros([BM, BN], tl.float32)
                for k0 in range(0, K, BK):
                    kk = k0 + tl.arange(0, BK)
                    km = kk < K
                    a = tl.load(ATT + rows[:, None] * K + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0,
                                cache_modifier=".cg")
                    w = tl.load(W + cols[:, None] * K + kk[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
                    acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
                _residual_store(X, SS, tile, acc, rows, rmask, cols, cmask, H, BM, CDT)

    @triton.jit(noinline=True)
    def _stage_gate_up(X, SS, LN, W, HB, B, pid, eps, H: tl.constexpr, NI: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr, NPART: tl.constexpr, NP: tl.constexpr, P: tl.constexpr,
                       PRECISION: tl.constexpr):
        CDT: tl.constexpr = W.dtype.element_ty
        TILES: tl.constexpr = (NI + BN - 1) // BN
        rows = tl.arange(0, BM)
        rmask = rows < B
        if pid < TILES:
            rstd = _row_rstd(X, SS, False, rows, rmask, eps, H, BM, BK, NPART, NP)
            for i in range((TILES + P - 1) // P):
                tile = pid + i * P
                if tile < TILES:
                    cols = tile * BN + tl.arange(0, BN)
                    cmask = cols < NI
                    gate = tl.zeros([BM, BN], tl.float32)
                    up = tl.zeros([BM, BN], tl.float32)
                    for k0 in range(0, H, BK):
                        kk = k0 + tl.arange(0, BK)
                        xn = _normed(X, LN, rows, rmask, kk, rstd, H, CDT)
                        wm = cmask[:, None] & (kk < H)[None, :]
                        wg = tl.load(W + cols[:, None] * H + kk[None, :], mask=wm, other=0.0)
                        wu = tl.load(W + (cols[:, None] + NI) * H + kk[None, :], mask=wm, other=0.0)
                        gate += tl.dot(xn, tl.trans(wg), input_precision=PRECISION)
                        up += tl.dot(xn, tl.trans(wu), input_precision=PRECISION)
                    g = gate.to(CDT).to(tl.float32)
                    act = (g / (1.0 + tl.exp(-g))).to(CDT).to(tl.float32)
                    h = (act * up.to(CDT).to(tl.float32)).to(CDT)
                    tl.store(HB + rows[:, None] * NI + cols[None, :], h, mask=rmask[:, None] & cmask[None, :])

    @triton.jit(noinline=True)
    def _stage_down(HB, W, X, SS, PART, Count, B, pid, H: tl.constexpr, NI: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, P: tl.constexpr, PRECISION: tl.constexpr):
        CDT: tl.constexpr = W.dtype.element_ty
        TILES: tl.constexpr = (H + BN - 1) // BN
        KS: tl.constexpr = ((NI + SPLIT - 1) // SPLIT + BK - 1) // BK * BK  # inner columns per split
        rows = tl.arange(0, BM)
        rmask = rows < B
        for i in range((TILES * SPLIT + P - 1) // P):
            item = pid + i * P
            if item < TILES * SPLIT:
                tile = item // SPLIT
                split = item % SPLIT
                cols = tile * BN + tl.arange(0, BN)
                cmask = cols < H
                acc = tl.zeros([BM, BN], tl.float32)
                for k in range(0, KS, BK):
                    kk = split * KS + k + tl.arange(0, BK)
                    km = kk < NI
                    a = tl.load(HB + rows[:, None] * NI + kk[None, :], mask=rmask[:, None] & km[None, :], other=0.0,
                                cache_modifier=".cg")
                    w = tl.load(W + cols[:, None] * NI + kk[None, :], mask=cmask[:, None] & km[None, :], other=0.0)
                    acc += tl.dot(a, tl.trans(w), input_precision=PRECISION)
                if SPLIT == 1:
                    _residual_store(X, SS, tile, acc, rows, rmask, cols, cmask, H, BM, CDT)
                else:
                    tl.store(PART + (split * BM + rows[:, None]) * H + cols[None, :], acc, mask=cmask[None, :])
                    tl.debug_barrier()
                    arrived = tl.atomic_add(Count + tile, 1, sem="acq_rel", scope="gpu")
                    if arrived == SPLIT - 1:  # the last of the tile's splits: sum them in split order
                        total = tl.zeros([BM, BN], tl.float32)
                        for s in range(SPLIT):
                            total += tl.load(PART + (s * BM + rows[:, None]) * H + cols[None, :], mask=cmask[None, :],
                                             other=0.0, cache_modifier=".cg")
                        _residual_store(X, SS, tile, total, rows, rmask, cols, cmask, H, BM, CDT)
                        tl.atomic_xchg(Count + tile, 0, sem="relaxed", scope="gpu")  # for the next layer

    @triton.jit(noinline=True)
    def _stage_embed(Ids, E, X, B, pid, H: tl.constexpr, BM: tl.constexpr, P: tl.constexpr):
        """``x[b] = E[ids[b]]`` (the embedding), a row per program."""
        for i in range((BM + P - 1) // P):
            b = pid + i * P
            if b < B:
                token = tl.load(Ids + b)
                for k0 in range(0, H, 256):
                    kk = k0 + tl.arange(0, 256)
                    tl.store(X + b * H + kk, tl.load(E + token * H + kk, mask=kk < H), mask=kk < H)

    @triton.jit(noinline=True)
    def _stage_final_norm(X, SS, LN, HN, B, pid, eps, H: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                          NPART: tl.constexpr, NP: tl.constexpr, P: tl.constexpr):
        """The final RMSNorm of every row, a block of ``BK`` columns per program, into ``HN`` (the LM head's input)."""
        CDT: tl.constexpr = HN.dtype.element_ty
        TILES: tl.constexpr = (H + BK - 1) // BK
        rows = tl.arange(0, BM)
        rmask = rows < B
        if pid < TILES:
            rstd = _row_rstd(X, SS, False, rows, rmask, eps, H, BM, BK, NPART, NP)
            for i in range((TILES + P - 1) // P):
                tile = pid + i * P
                if tile < TILES:
                    kk = tile * BK + tl.arange(0, BK)
                    xn = _normed(X, LN, rows, rmask, kk, rstd, H, CDT)
                    tl.store(HN + rows[:, None] * H + kk[None, :], xn, mask=rmask[:, None] & (kk < H)[None, :])

    @triton.jit
    def _layers_kernel(Ids, E, X, SSA, SSD, LN1, WQKV, BQKV, WO, LN2, WGU, WD, LNF, HN, QKV, ATT, HB, PART, Count,
                       Sync, Cos, Sin, Pos, KC, VC, Slot, Valid, B, eps, scale, sKl, sKb, sKh, sKt, smb,
                       FIRST: tl.constexpr, LAST: tl.constexpr, H: tl.constexpr, NI: tl.constexpr, HQ: tl.constexpr,
                       HK: tl.constexpr, HALF: tl.constexpr, T: tl.constexpr, L: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN_QKV: tl.constexpr,
                       BN_O: tl.constexpr, BN_GU: tl.constexpr, BN_DOWN: tl.constexpr, SPLIT: tl.constexpr,
                       NP_A: tl.constexpr, NP_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
                       P: tl.constexpr, SYNC: tl.constexpr, PREFETCH: tl.constexpr, PRECISION: tl.constexpr,
                       STAGES_ON: tl.constexpr):
        """Stages FIRST..LAST-1 with ``P`` programs: stage 0 the embedding, stage 1 + 5l + k step k of layer l,
        stage 5L + 1 the final norm. ``STAGES_ON``: a bit per layer step (31: all); a step whose bit is off is
        skipped (benchmarks/gpu_layers.py times them apart)."""
        D: tl.constexpr = 2 * HALF
        NQKV: tl.constexpr = (HQ + 2 * HK) * D
        ES: tl.constexpr = WQKV.dtype.element_ty.primitive_bitwidth // 8
        # the next norm reads the per-tile sums of squares of the down / output projections' column tiles
        NPART_A: tl.constexpr = (H + BN_DOWN - 1) // BN_DOWN
        NPART_D: tl.constexpr = (H + BN_O - 1) // BN_O
        pid = tl.program_id(0)
        for stage in range(FIRST, LAST):
            if stage == 0:
                _stage_embed(Ids, E, X, B, pid, H, BM, P)
            elif stage == 5 * L + 1:
                _stage_final_norm(X, SSA, LNF, HN, B, pid, eps, H, BM, BK, NPART_A, NP_A, P)
            else:
                layer = (stage - 1) // 5 + tl.zeros([], tl.int64)  # 64-bit offsets: 8B-model weights pass 2**31
                phase = (stage - 1) % 5
                if PREFETCH:  # the weights of the steps ahead, into L2 (a layer of a 0.5B model: 26 MB of 50)
                    if phase == 0:
                        _prefetch_l2(WO + layer * (H * HQ * D), H * HQ * D * ES, pid, P)
                        _prefetch_l2(WGU + layer * (2 * NI * H), 2 * NI * H * ES, pid, P)
                    elif phase == 2:
                        _prefetch_l2(WD + layer * (H * NI), H * NI * ES, pid, P)
                    elif phase == 3:
                        if layer + 1 < L:
                            _prefetch_l2(WQKV + (layer + 1) * (NQKV * H), NQKV * H * ES, pid, P)
                if phase == 0 and (STAGES_ON & 1) != 0:
                    _stage_qkv(X, SSA, layer == 0, LN1 + layer * H, WQKV + layer * (NQKV * H), BQKV + layer * NQKV,
                               QKV, B, pid, eps, H, NQKV, HAS_BIAS, BM, BN_QKV, BK, NPART_A, NP_A, P, PRECISION)
                elif phase == 1 and (STAGES_ON & 2) != 0:
                    _stage_attention(QKV, Cos, Sin, Pos, KC + layer * sKl, VC + layer * sKl, Slot, Valid, ATT, B, pid,
                                     scale, sKb, sKh, sKt, smb, T, HQ, HK, HQ // HK, BLOCK_G, HALF, BLOCK_T, BM, P,
                                     PRECISION)
                elif phase == 2 and (STAGES_ON & 4) != 0:
                    _stage_o(ATT, WO + layer * (H * HQ * D), X, SSD, B, pid, H, HQ * D, BM, BN_O, BK, P, PRECISION)
                elif phase == 3 and (STAGES_ON & 8) != 0:
                    _stage_gate_up(X, SSD, LN2 + layer * H, WGU + layer * (2 * NI * H), HB, B, pid, eps, H, NI, BM,
                                   BN_GU, BK, NPART_D, NP_D, P, PRECISION)
                elif phase == 4 and (STAGES_ON & 16) != 0:
                    _stage_down(HB, WD + layer * (H * NI), X, SSA, PART, Count, B, pid, H, NI, BM, BN_DOWN, BK, SPLIT,
                                P, PRECISION)
            if SYNC:
                if stage + 1 < LAST:
                    _grid_sync(Sync, (stage - FIRST + 1) * P)


class TritonLayers:
    """Every decoder layer of one decode step as :func:`_layers_kernel` (see the module docstring).

    :meth:`build` takes, after the prefill, copies of the layers' weights in the compute dtype,
    stacked per kind (q/k/v and gate/up concatenated), and moves the static cache's keys and values
    into one stacked buffer that the cache's layers then view (same memory, no copy kept). Each
    :meth:`step` runs the kernel (the embedding, every layer, the final norm) and the LM head, and
    returns the logits ``[B, V]`` (the compute dtype), allocating nothing the kernel reads across
    steps, so it can be captured in a CUDA graph. ``programs`` sets the grid (default: one per SM).
    """

    def __init__(self, **state) -> None:
        self.__dict__.update(state)

    @classmethod
    @torch.no_grad()
    def build(cls, model, cache, batch: int, dtype: torch.dtype, programs: int | None = None,
              tiles: dict | None = None) -> TritonLayers:
        """Raises ValueError with :func:`unsupported_reason`'s reason when the model does not run here."""
        device = next(model.parameters()).device
        reason = unsupported_reason(model, batch, device)
        if reason is not None:
            raise ValueError(f"TritonLayers cannot decode this model: {reason}")
        top = _inner(model)
        body = top.model
        layers = list(body.layers)
        attn0 = layers[0].self_attn
        H = top.config.hidden_size
        D = attn0.head_dim
        HQ, HK = attn0.q_proj.out_features // D, attn0.k_proj.out_features // D
        NI = layers[0].mlp.gate_proj.out_features

        def stack(fn):
            return torch.stack([fn(layer).detach().to(dtype) for layer in layers]).contiguous()

        has_bias = attn0.q_proj.bias is not None
        residual_dtype = body.embed_tokens.weight.dtype
        keys = torch.stack([layer.keys for layer in cache.layers])  # [L, B, Hk, T, Dh]
        values = torch.stack([layer.values for layer in cache.layers])
        for i, layer in enumerate(cache.layers):  # the cache's layers now view the kernel's buffers
            layer.keys, layer.values = keys[i], values[i]
        T = keys.shape[3]
        # the rotary tables of every position the cache can hold, from the model's own module (the same values
        # its forward computes per step)
        cos, sin = body.rotary_emb(torch.zeros(1, 1, H, dtype=residual_dtype, device=device),
                                   torch.arange(T, device=device)[None])
        n_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3
        t = {"BK": 64, "BN_QKV": 16, "BN_O": 16, "BN_GU": 64, "BN_DOWN": 32, "SPLIT": 4, "num_warps": 8,
             "num_stages": 3, "prefetch": True, **(tiles or {})}
        BM = max(16, triton.next_power_of_2(batch))
        f32 = dict(dtype=torch.float32, device=device)
        return cls(
            model=model, body=body, head=top.lm_head.weight.detach().to(dtype), dtype=dtype, batch=batch,
            residual_dtype=residual_dtype, H=H, NI=NI, HQ=HQ, HK=HK, D=D, T=T, L=len(layers), has_bias=has_bias,
            eps=float(layers[0].input_layernorm.variance_epsilon), scale=float(attn0.scaling), tiles=t, BM=BM,
            programs=programs or n_sms,
            ln1=torch.stack([x.input_layernorm.weight.detach() for x in layers]).contiguous(),
            ln2=torch.stack([x.post_attention_layernorm.weight.detach() for x in layers]).contiguous(),
            wqkv=stack(lambda x: torch.cat([x.self_attn.q_proj.weight, x.self_attn.k_proj.weight,
                                            x.self_attn.v_proj.weight])),
            bqkv=(stack(lambda x: torch.cat([x.self_attn.q_proj.bias, x.self_attn.k_proj.bias,
                                             x.self_attn.v_proj.bias])) if has_bias else torch.zeros(1, dtype=dtype,
                                                                                                   device=device)),
            wo=stack(lambda x: x.self_attn.o_proj.weight),
            wgu=stack(lambda x: torch.cat([x.mlp.gate_proj.weight, x.mlp.up_proj.weight])),
            wd=stack(lambda x: x.mlp.down_proj.weight),
            keys=keys, values=values, cos=cos[0].contiguous(), sin=sin[0].contiguous(),
            embed=body.embed_tokens.weight.detach(), lnf=body.norm.weight.detach(),
            x=torch.zeros(batch, H, dtype=residual_dtype, device=device),
            hn=torch.zeros(batch, H, dtype=dtype, device=device),
            qkv=torch.zeros(batch, (HQ + 2 * HK) * D, dtype=dtype, device=device),
            att=torch.zeros(batch, HQ * D, dtype=dtype, device=device),
            hb=torch.zeros(batch, NI, dtype=dtype, device=device),
            ssa=torch.zeros(triton.next_power_of_2(-(-H // t["BN_DOWN"])), BM, **f32),
            ssd=torch.zeros(triton.next_power_of_2(-(-H // t["BN_O"])), BM, **f32),
            part=torch.zeros(t["SPLIT"], BM, H, **f32),
            count=torch.zeros(-(-H // t["BN_DOWN"]), dtype=torch.int32, device=device),
            sync=torch.zeros(2, dtype=torch.int32, device=device),
        )

    @property
    def failed(self) -> bool:
        """True when a launch's grid barrier timed out (its programs were not all resident): the
        logits of that step are wrong. Reads the flag from the device (a sync)."""
        return bool(self.sync[1].item())

    def _launch(self, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor) -> None:
        t = self.tiles
        sync = not INTERPRETED  # the interpreter runs programs one after another: a stage per launch
        stages = STAGES * self.L + 2  # the embedding, the layers' steps, the final norm
        launches = [(0, stages)] if sync else [(s, s + 1) for s in range(stages)]
        kc = self.keys
        for first, last in launches:
            self.sync[0].zero_()
            _layers_kernel[(self.programs,)](
                ids, self.embed, self.x, self.ssa, self.ssd, self.ln1, self.wqkv, self.bqkv, self.wo, self.ln2,
                self.wgu, self.wd, self.lnf, self.hn, self.qkv, self.att, self.hb, self.part, self.count, self.sync,
                self.cos, self.sin, positions, kc, self.values, slot, valid, self.batch, self.eps, self.scale,
                kc.stride(0), kc.stride(1), kc.stride(2), kc.stride(3), valid.stride(0),
                FIRST=first, LAST=last, H=self.H, NI=self.NI, HQ=self.HQ, HK=self.HK, HALF=self.D // 2, T=self.T,
                L=self.L, HAS_BIAS=self.has_bias, BM=self.BM, BK=t["BK"], BN_QKV=t["BN_QKV"], BN_O=t["BN_O"],
                BN_GU=t["BN_GU"], BN_DOWN=t["BN_DOWN"], SPLIT=t["SPLIT"], NP_A=self.ssa.shape[0],
                NP_D=self.ssd.shape[0], BLOCK_G=max(16, triton.next_power_of_2(self.HQ // self.HK)), BLOCK_T=64,
                P=self.programs, SYNC=sync, PREFETCH=sync and t["prefetch"],
                PRECISION="ieee" if self.dtype == torch.float32 else "tf32", STAGES_ON=t.get("on", 31),
                num_warps=t["num_warps"], num_stages=t["num_stages"],
            )

    def step(self, ids: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` after appending ``ids`` ``[B, 1]`` at cache slot ``slot`` (a one-element
        device tensor), the rows at ``positions`` ``[B, 1]`` (below the cache's length); ``valid`` ``[B, T]``
        marks the slots attended (``slot`` included). Writes the new keys and values into the cache: one
        kernel launch and the LM head's matmul."""
        self._launch(ids, positions, slot, valid)
        return F.linear(self.hn, self.head)


def bandwidth_bound_ms(layers: TritonLayers, tbps: float, context: float, head: bool = True) -> float:
    """The step's memory-bandwidth bound in ms: the weights once (the LM head's with ``head``) plus the K/V
    of ``context`` slots, over ``tbps`` TB/s."""
    mats = (layers.wqkv, layers.wo, layers.wgu, layers.wd, *((layers.head,) if head else ()))
    weights = sum(t.numel() * t.element_size() for t in mats)
    kv = 2 * layers.L * layers.batch * layers.HK * context * layers.D * layers.keys.element_size()
    return 1000 * (weights + kv) / (tbps * 1e12)
