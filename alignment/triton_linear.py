"""A decode step's projections as one Triton kernel each: split-K with the reduction inside, SiLU·mul fused.

Why: at batch 64 the 0.5B decode step is kernel latency, not bytes (benchmarks/RESULTS.md, run 31: 248
kernels, 1.12 ms of GPU time against a 0.40 ms bound). cuBLAS runs a thin projection (M = 64 rows,
K = 4,864) as two kernels, a split-K GEMM and its ``splitKreduce``; the MLP's ``silu(gate) * up`` is a
third. Here each projection is one launch, and the gate/up projection writes ``silu(gate) * up``
directly (the MLP in two kernels instead of four).

Math, for ``x`` ``[M, K]`` and ``weight`` ``[N, K]`` (an ``nn.Linear``'s)::

    y[m, n] = Σ_k x[m, k] · weight[n, k]  (+ bias[n])         fp32 accumulation, rounded once
    gated:  y[m, n] = silu(g) · u,  g = round(x · weight[n]),  u = round(x · weight[N + n])

where ``weight`` ``[2N, K]`` is ``[gate; up]`` (:mod:`alignment.fused_decode`'s layout) and
``round`` is to the compute dtype, as the compiled step rounds the matmul's output before the
pointwise kernel that applies the activation.

Split-K in one launch (CUTLASS's serial split-K): the K range is cut into ``SPLIT`` slices and each
program computes one output tile over one slice. A program stores its fp32 partial sum to a
workspace, waits for its own threads (a barrier), then increments the tile's counter with
acquire-release semantics at GPU scope. The program that reads ``SPLIT − 1`` sums the ``SPLIT``
partials **in slice order** (so the bits do not depend on which program finished last: the kernel is
deterministic), applies the epilogue, writes the tile and resets the counter to zero. The counters
therefore start and end every launch at zero, across calls and CUDA-graph replays; a launch that
does not finish (a killed process) leaves them dirty, so they live with the decode weights
(:class:`alignment.fused_decode.FusedDecodeWeights`), which are rebuilt for every generate batch.

Assumptions: CUDA tensors (or Triton's interpreter on CPU, for the tests), ``M ≤ MAX_ROWS``
(decode steps, not prefills), fp32 accumulation whatever the input dtype. Importing this module
needs no GPU; :data:`AVAILABLE` is False where Triton is not installed (then nothing here runs).
"""

from __future__ import annotations

import torch

from alignment.triton_attention import AVAILABLE, INTERPRETED

if AVAILABLE:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

__all__ = ["AVAILABLE", "MAX_ROWS", "counters", "linear", "supported"]

MAX_ROWS = 256
"""Rows (batch × one token) up to which the kernel runs; larger inputs are prefills, cuBLAS's ground."""

MAX_SPLIT = 16
MAX_TILES = 4096
"""Output tiles one launch may have: the counters' length (``M ≤ 256`` rows in tiles of 64 × ``N``
in tiles of 32 covers ``N ≤ 32,768``)."""

CONFIGS = [(bn, bk, s, 4, 4) for bn in (32, 64, 128) for bk, splits in ((128, (1, 2)), (64, (2, 4, 8, 16)))
           for s in splits]
"""``(BN, BK, SPLIT, warps, stages)`` candidates that ``benchmarks/gpu_linear.py`` times per shape."""

PLANS: dict[tuple[int, int, bool], tuple] = {}
"""Measured best config per ``(N, K, gated)`` (``benchmarks/gpu_linear.py --plans-out``); shapes not
here get :func:`plan`'s heuristic."""

INTERPRETER_CONFIG = (32, 16, 3, 4, 1)  # small blocks, three slices: the split-K path runs in the tests


def plan(n: int, k: int, gated: bool, sms: int = 132) -> tuple:
    """The config for an ``[M ≤ 64, K] × [K, N]`` projection: :data:`PLANS`'s, else tiles of 64
    outputs and enough K slices for about two programs per SM (thin GEMMs pull their weights at
    the copy rate only with many programs in flight), slices at least two blocks of 64 deep."""
    if (n, k, gated) in PLANS:
        return PLANS[(n, k, gated)]
    tiles = -(-n // 64)
    split = 1
    while split < MAX_SPLIT and tiles * split * 2 <= 2 * sms and k // (split * 2) >= 128:
        split *= 2
    return (64, 64, split, 4, 4)


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when :func:`linear` runs: Triton on ``x``'s device (CUDA, or the interpreter on CPU),
    at most :data:`MAX_ROWS` rows, a floating ``x`` and a bf16, fp16 or fp32 ``weight``."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (AVAILABLE and (x.is_cuda or INTERPRETED) and 0 < rows <= MAX_ROWS and x.is_floating_point()
            and weight.dtype in (torch.bfloat16, torch.float16, torch.float32))


def counters(device: torch.device | str) -> torch.Tensor:
    """Zeroed split-K counters for :func:`linear` on ``device`` (reused across calls: each launch
    leaves them at zero). One per decode batch is enough: launches on one stream do not overlap."""
    return torch.zeros(MAX_TILES, dtype=torch.int32, device=device)


if AVAILABLE:

    @triton.jit
    def _epilogue(acc, acc_up, Bias, rn, n_ok, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, OUT_DTYPE: tl.constexpr):
        if HAS_BIAS:
            acc += tl.load(Bias + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:  # the matmul's output rounded, then the activation in fp32, as the compiled step
            g = acc.to(OUT_DTYPE).to(tl.float32)
            u = acc_up.to(OUT_DTYPE).to(tl.float32)
            acc = g * tl.sigmoid(g) * u
        return acc.to(OUT_DTYPE)

    @triton.jit
    def _linear_kernel(X, W, Bias, Out, Part, Count, M, N, K: tl.constexpr, sxm, sxk, swn, swk, som, son,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, GATED: tl.constexpr, PRECISION: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BM, BN), tl.float32)
        acc_up = tl.zeros((BM, BN), tl.float32)
        PER_SPLIT: tl.constexpr = ((K + SPLIT - 1) // SPLIT + BK - 1) // BK * BK  # whole blocks; the last slice may be short or empty
        for k0 in range(0, PER_SPLIT, BK):
            k = pid_s * PER_SPLIT + k0 + rk
            k_ok = k < K
            x = tl.load(X + rm[:, None] * sxm + k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + rn[None, :] * swn + k[:, None] * swk, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            if GATED:
                wu = tl.load(W + (rn + N)[None, :] * swn + k[:, None] * swk, mask=n_ok[None, :] & k_ok[:, None],
                             other=0.0)
                acc_up = tl.dot(x, wu, acc_up, input_precision=PRECISION)
        out_ptr = Out + rm[:, None] * som + rn[None, :] * son
        out_ok = m_ok[:, None] & n_ok[None, :]
        if SPLIT == 1:
            tl.store(out_ptr, _epilogue(acc, acc_up, Bias, rn, n_ok, HAS_BIAS, GATED, Out.dtype.element_ty), mask=out_ok)
        else:
            # workspace [SPLIT, 1 + GATED, M, N] fp32, contiguous
            plane = M * N
            part = Part + rm[:, None] * N + rn[None, :]
            tl.store(part + pid_s * (1 + GATED) * plane, acc, mask=out_ok)
            if GATED:
                tl.store(part + (pid_s * 2 + 1) * plane, acc_up, mask=out_ok)
            tl.debug_barrier()  # every thread's partial stored before the release below
            tile = pid_m * tl.cdiv(N, BN) + pid_n
            arrived = tl.atomic_add(Count + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:  # the last program of this tile sums the slices in order
                acc = tl.zeros((BM, BN), tl.float32)
                acc_up = tl.zeros((BM, BN), tl.float32)
                for s in tl.static_range(SPLIT):
                    acc += tl.load(part + s * (1 + GATED) * plane, mask=out_ok, other=0.0, cache_modifier=".cg")
                    if GATED:
                        acc_up += tl.load(part + (s * 2 + 1) * plane, mask=out_ok, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr, _epilogue(acc, acc_up, Bias, rn, n_ok, HAS_BIAS, GATED, Out.dtype.element_ty),
                         mask=out_ok)
                tl.atomic_xchg(Count + tile, 0)  # zero again for the next launch

    def _launch(x, weight, bias, out, part, count, n, gated: bool, config: tuple | None):
        M, K = x.shape
        BM = 16 if M <= 16 else 32 if M <= 32 else 64
        args = (x, weight, bias if bias is not None else weight, out, part, count, M, n, K,
                x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1))
        flags = dict(BM=BM, HAS_BIAS=bias is not None, GATED=gated,
                     PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
        if config is None:
            config = INTERPRETER_CONFIG if INTERPRETED else plan(n, K, gated)
        bn, bk, split, warps, stages = config
        grid = (triton.cdiv(n, bn), split, triton.cdiv(M, BM))
        launch = _linear_kernel if INTERPRETED else wrap_triton(_linear_kernel)
        launch[grid](*args, **flags, BN=bn, BK=bk, SPLIT=split, num_warps=warps, num_stages=stages)

    @triton_op("alignflow::decode_linear", mutates_args={"count"})
    def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, count: torch.Tensor,
                       gated: bool) -> torch.Tensor:
        n = weight.shape[0] // 2 if gated else weight.shape[0]
        out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
        part = torch.empty(MAX_SPLIT, 2 if gated else 1, x.shape[0], n, dtype=torch.float32, device=x.device)
        _launch(x, weight, bias, out, part, count, n, gated, None)
        return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, count: torch.Tensor,
           gated: bool = False, config: tuple | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as one kernel, or with ``gated`` the MLP's ``silu(gate) * up``
    over ``weight = [gate; up]`` (``bias`` must then be None); any leading shape. ``x`` is cast to
    ``weight.dtype`` and so is the output, as autocast does for ``F.linear`` over compute-dtype weights.

    ``count``: :func:`counters` for ``x``'s device. ``config`` ``(BN, BK, SPLIT, warps, stages)``
    fixes the kernel's blocks (benchmarks and tests); by default :func:`plan` picks them. Raises RuntimeError when Triton is not
    installed and ValueError for a gated call with a bias; check :func:`supported` first.
    """
    if not AVAILABLE:
        raise RuntimeError("triton_linear needs Triton (it ships with torch's CUDA wheels)")
    if gated and bias is not None:
        raise ValueError("the gated form takes no bias")
    rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    if config is not None:
        n = weight.shape[0] // 2 if gated else weight.shape[0]
        out = torch.empty(rows.shape[0], n, dtype=rows.dtype, device=x.device)
        part = torch.empty(config[2], 2 if gated else 1, rows.shape[0], n, dtype=torch.float32, device=x.device)
        _launch(rows, weight, bias, out, part, count, n, gated, config)
    else:
        out = _decode_linear(rows, weight, bias, count, gated)
    return out.view(*x.shape[:-1], out.shape[-1])
