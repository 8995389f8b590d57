"""Decoding with a static KV cache and the one-token step replayed as a CUDA graph.

:class:`GraphDecoder` is a drop-in for :class:`alignment.generation.KVDecoder` (same
``prefill`` / ``step`` interface, used by :func:`alignment.generation.generate` when
``GenerationSettings.cuda_graphs`` is on). Why it is fast: a decode step of a small model is a
thousand tiny kernels whose launch cost (Python + transformers + the CUDA driver) is ten times
their run time. With every shape fixed — batch, a cache preallocated at ``prompt + new tokens``
slots, one 4-D attention mask buffer — the step reads and writes the same device addresses
every time, so it is captured once and replayed as one graph launch per token.

Layout: the prompts (left-padded) occupy cache slots ``0..P-1``; generated token ``i`` goes to
slot ``P + i``. The attention mask is a boolean ``[B, 1, q, T]`` tensor built here and passed
to the model as a prepared 4-D mask (transformers uses it as given): key slot ``k`` is visible
when it is filled and valid for the row and not in the query's future. Every query also sees
its own slot, so a left-padding position attends to itself instead of to nothing (an all-masked
row would make NaNs that then leak through ``0 * NaN`` into real rows).

Decode steps use :func:`decode_attention` (registered with transformers as
``"alignflow_decode"`` and switched on only around the step): one query per row against the
whole cache, grouped-query heads served from their shared K/V without materializing repeats
(transformers' SDPA path copies K and V ``heads / kv_heads`` times whenever a mask is given,
which is every static-cache step). The cache stores keys and values in the compute dtype (bf16
under autocast; transformers would otherwise allocate it from the first key's dtype, fp32 after
the rotary embedding, and then fail on bf16 values).

Assumptions: a transformers decoder whose forward accepts ``position_ids``, a prepared 4-D
``attention_mask`` and a ``StaticCache`` that tracks its own write position (transformers 5);
full attention in every layer (sliding-window configs are refused). With :meth:`GraphDecoder.advance`
the token choice (sampling from a seeded generator, registered with the graph, and the caller's
bookkeeping) is captured with the forward: a decode step is then one graph launch, with no
Python between the kernels.

With ``compile_step`` the step's forward goes through ``torch.compile`` (one module-level
compiled function, so decoders of later batches with the same shapes reuse the compiled code)
before it is captured: inductor fuses the element-wise kernels between the matmuls.

On CPU, or when ``use_graph=False``, the same static-buffer step runs eagerly: the results are
the same and this is what the CPU tests exercise. If capture fails (a model that syncs with the
host inside its forward) the decoder logs it and continues eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging

import torch
from transformers import AttentionInterface, StaticCache

from alignment import triton_attention
from alignment.fast_paths import attention_implementation
from alignment.fused_decode import FusedDecodeWeights

log = logging.getLogger(__name__)

__all__ = ["DECODE_ATTENTION", "DECODE_ATTENTION_TRITON", "GraphDecoder", "decode_attention",
           "decode_attention_triton", "graph_supported"]

DECODE_ATTENTION = "alignflow_decode"
DECODE_ATTENTION_TRITON = "alignflow_decode_triton"


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of ``q`` queries over a cache, grouped-query aware, as a transformers attention function.

    ``query`` ``[B, Hq, q, D]``, ``key``/``value`` ``[B, Hk, T, D]`` with ``Hq = G * Hk`` (query head
    ``h`` reads K/V head ``h // G``, transformers' ``repeat_kv`` order), ``attention_mask`` boolean
    ``[B, 1, q, T]`` (True = attend). softmax(q k^T * scaling) v with the softmax in fp32. Returns
    ``([B, q, Hq, D], None)``. No dropout (inference only).
    """
    B, Hq, q, D = query.shape
    Hk = key.shape[1]
    G = Hq // Hk
    scale = scaling if scaling is not None else D**-0.5
    grouped = query.reshape(B, Hk, G * q, D)  # rows g*q + i: head (kv*G + g), query i
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scale  # [B, Hk, G*q, T]
    mask = attention_mask[:, :, None].expand(B, 1, G, q, attention_mask.shape[-1]).reshape(B, 1, G * q, -1)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).reshape(B, Hq, q, D)
    return out.transpose(1, 2).contiguous(), None


def decode_attention_triton(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """:func:`decode_attention` as one Triton kernel (:func:`alignment.triton_attention.gqa_decode`)
    where it applies (a CUDA device, one query position, a power-of-two head size); else
    :func:`decode_attention` itself. Same arguments and result, up to rounding."""
    if triton_attention.supported(query, key):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return triton_attention.gqa_decode(query, key, value, attention_mask[:, 0, 0, :], scale), None
    return decode_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionInterface.register(DECODE_ATTENTION_TRITON, decode_attention_triton)


class _ComputeDtypeCache(StaticCache):
    """A StaticCache that stores keys and values in one dtype (``compute_dtype``), casting on write."""

    compute_dtype: torch.dtype | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.compute_dtype is not None:
            key_states, value_states = key_states.to(self.compute_dtype), value_states.to(self.compute_dtype)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def _inner(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "module", inner)


def graph_supported(model) -> bool:
    """True when every layer uses full attention: ``layer_types`` (when the config has them)
    are all ``full_attention``; configs without them must not set a ``sliding_window``."""
    config = _inner(model).config
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return set(kinds) == {"full_attention"}
    return getattr(config, "sliding_window", None) is None


def _model_forward(model, ids, mask4d, positions, kwargs):
    """One forward returning the last position's logits ``[B, V]`` (what the step compiles)."""
    return model(input_ids=ids, attention_mask=mask4d, position_ids=positions, **kwargs).logits[:, -1, :]


@functools.cache
def _compiled_model_forward():
    """The compiled :func:`_model_forward`, made on first use (importing the module stays free
    of torch.compile set-up); one for the process, so later decoders reuse its compiled code."""
    return torch.compile(_model_forward, dynamic=False)


class GraphDecoder:
    """Prefill + decode steps over a ``StaticCache``; the step is a CUDA graph on CUDA devices.

    ``prefill(prompt_ids, prompt_mask, max_new_tokens)`` returns the logits ``[B, V]`` for the
    first new token; each ``step(tokens)`` appends ``tokens`` ``[B]`` and returns the logits for
    the next one. ``advance(pick, logits)`` is ``step(pick(logits))`` with the token choice inside
    the graph: ``pick`` (sampling and the caller's bookkeeping, in place on fixed buffers, no host
    sync) is captured with the forward, so a decode step is one graph launch and nothing else.
    The first call runs eagerly (it warms up kernels and library handles), the second captures
    the graph and every later one replays it. The returned logits live in a buffer the next call
    overwrites: use them (sample) before calling again. Use either ``step`` or ``advance`` for one
    batch, not both. A random generator ``pick`` draws from must be passed as ``generator``: it is
    registered with the graph, so each replay advances it as an eager call would.
    One decoder serves one batch; build a new one per :func:`~alignment.generation.generate` batch.
    ``fuse_projections`` decodes with :mod:`alignment.fused_decode` weights (one matmul for
    q/k/v and one for gate/up, in the compute dtype). ``triton_attention`` runs each decode step's
    attention as one Triton kernel on CUDA (:mod:`alignment.triton_attention`; elsewhere the
    torch path). ``fuse_cache_update`` (with both of those) also folds each step's rotary
    embedding and cache write into that kernel (:func:`alignment.triton_attention.rope_write_decode`):
    the decode steps then write the cache at the decoder's own slot, not through the cache's
    ``update`` (whose position counter stays where the prefill left it).
    Raises ValueError for models with sliding-window attention.
    """

    def __init__(self, model, use_graph: bool | None = None, compile_step: bool = False,
                 fuse_projections: bool = False, triton_attention: bool = False,
                 fuse_cache_update: bool = False) -> None:
        if not graph_supported(model):
            raise ValueError("GraphDecoder needs full attention in every layer (sliding-window models are not supported)")
        self.model = model
        self.use_graph = use_graph
        params = set(inspect.signature(_inner(model).forward).parameters)
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.keep_last = "logits_to_keep" in params
        self.compile_step = compile_step
        self.fuse_projections = fuse_projections
        self.attention = DECODE_ATTENTION_TRITON if triton_attention else DECODE_ATTENTION
        self.fuse_cache_update = fuse_cache_update and fuse_projections and triton_attention
        self.fused = None
        self.tokens_in: torch.Tensor | None = None  # graph inputs at fixed addresses (step / advance)
        self.logits_in: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps_run = 0
        self.captured = False

    # ------------------------------------------------------------------ forwards
    def _forward(self, ids: torch.Tensor, mask4d: torch.Tensor, positions: torch.Tensor,
                 compiled: bool = False) -> torch.Tensor:
        kwargs = {self.cache_kwarg: self.cache, "use_cache": True}
        if self.keep_last:
            kwargs["logits_to_keep"] = 1
        forward = _compiled_model_forward() if compiled else _model_forward
        return forward(self.model, ids, mask4d, positions, kwargs)

    def _autocast(self):
        """The caller's autocast state, with the weight-cast cache off (required under capture)."""
        dev = self.device.type
        if not torch.is_autocast_enabled(dev):
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=torch.get_autocast_dtype(dev), cache_enabled=False)

    def prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the prompts into a fresh cache of ``P + max_new_tokens`` slots; logits ``[B, V]``."""
        B, P = prompt_ids.shape
        T = P + max_new_tokens
        self.device = prompt_ids.device
        if self.use_graph is None:
            self.use_graph = self.device.type == "cuda"
        config = _inner(self.model).config
        self.cache = _ComputeDtypeCache(config=config, max_cache_len=T)
        dev = self.device.type
        self.cache.compute_dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                                    else next(self.model.parameters()).dtype)
        if self.fuse_projections:
            self.fused = FusedDecodeWeights.build(self.model, self.cache.compute_dtype)
        self.valid = torch.zeros(B, T, dtype=torch.bool, device=self.device)
        self.valid[:, :P] = prompt_mask.bool()
        slots = torch.arange(T, device=self.device)
        query = torch.arange(P, device=self.device)
        causal = slots[None, :] <= query[:, None]  # [P, T]
        own = slots[None, :] == query[:, None]
        mask = (causal[None] & self.valid[:, None, :]) | own[None]  # [B, P, T]
        positions = (prompt_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        with self._autocast():
            logits = self._forward(prompt_ids, mask[:, None], positions)
        # Static step buffers: the graph reads and updates these addresses on every replay.
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=self.device)
        self.positions = (positions[:, -1:] + 1).clone()
        self.slot = torch.tensor([P], device=self.device)  # the slot the next token goes to
        self.step_mask = self.valid[:, None, None, :]  # a view: marking a slot valid updates it
        if self.fuse_cache_update:  # read by the fused attention forward (alignment.fused_decode)
            self.cache.fused_update_slot = self.slot
        self.next_slot = P
        self.total = T
        return logits

    def _step_body(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` at the slot ``self.slot`` and run the one-token forward (what is captured)."""
        self.ids.copy_(tokens.view(-1, 1))
        self.valid.index_fill_(1, self.slot, True)
        patched = self.fused.patched() if self.fused is not None else contextlib.nullcontext()
        with self._autocast(), attention_implementation(_inner(self.model).config, self.attention), patched:
            logits = self._forward(self.ids, self.step_mask, self.positions, compiled=self.compile_step)
        self.positions.add_(1)
        self.slot.add_(1)
        return logits

    def _run(self, body, generator: torch.Generator | None = None) -> torch.Tensor:
        """``body()`` eagerly, or as the captured graph (first call eager on a side stream,
        second captured and replayed, later ones replayed); returns its logits."""
        if self.next_slot >= self.total:
            raise RuntimeError(f"the static cache holds {self.total} slots; no room for another token")
        if not self.use_graph:
            logits = body()
        elif self.graph is not None:
            self.graph.replay()
            logits = self.graph_logits
        elif self.steps_run == 0:
            # First call eagerly on a side stream: lazy inits (library handles, workspaces) happen
            # here, outside the capture, as the CUDA graph documentation asks.
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                logits = body()
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            logits = self._capture(body, generator)
        self.next_slot += 1
        self.steps_run += 1
        return logits

    def _capture(self, body, generator: torch.Generator | None) -> torch.Tensor:
        """Capture ``body`` (not run) and replay it; runs it eagerly from now on when capture fails."""
        graph = torch.cuda.CUDAGraph()
        try:
            if generator is not None:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph):
                out = body()
        except Exception as err:  # a host sync or unsupported op inside the forward
            log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", err)
            self.use_graph = False
            return body()
        self.graph, self.graph_logits, self.captured = graph, out, True
        graph.replay()
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` ``[B]`` at the next slot; returns the logits ``[B, V]`` for the following token."""
        if self.use_graph:  # the graph reads the tokens from a fixed address
            if self.tokens_in is None:
                self.tokens_in = torch.empty_like(tokens)
            self.tokens_in.copy_(tokens)
            tokens = self.tokens_in
        return self._run(lambda: self._step_body(tokens))

    def advance(self, pick, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``step(pick(logits))``, with ``pick`` inside the captured graph; returns the next logits."""
        if not self.use_graph:
            return self._run(lambda: self._step_body(pick(logits)))
        if self.logits_in is None:
            self.logits_in = logits.clone()  # the graph samples from here and writes the next logits here
        elif self.graph is None:
            self.logits_in.copy_(logits)

        def body():
            self.logits_in.copy_(self._step_body(pick(self.logits_in)))
            return self.logits_in

        return self._run(body, generator)
