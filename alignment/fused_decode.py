"""Decode-time weights: q/k/v and gate/up as one matmul each, every matmul in the compute dtype.

Why: at batch 64 a decode step of a 0.5–1B model is bound by per-kernel latency, not by bytes. On
an H100 a 2 MB k or v projection takes 4–5 µs, nearly as long as a 9 MB gate projection (run 8 of
benchmarks/RESULTS.md: 443 kernels in a 1.65 ms step for 0.5B against a 0.40 ms bandwidth bound).
Concatenating ``[q; k; v]`` and ``[gate; up]`` runs 4 matmuls per layer instead of 7, each
reading the same bytes. Holding the weights in the compute dtype also spares the cast of fp32
trainer weights under autocast (rollouts), which otherwise reads every fp32 matrix and writes a
bf16 copy on every token, the LM head included.

:meth:`FusedDecodeWeights.build` copies the weights once per generate batch (the policy changes
between rollouts, so the copy is taken when decoding starts, at the cost of one read of the
weights). :meth:`FusedDecodeWeights.patched` then swaps, for the duration of a forward, the class
of each supported attention and MLP module for a subclass whose ``forward`` uses the copies, and
the LM head's for one that reads its compute-dtype copy. Swapping classes (not instance
``forward`` attributes) keeps ``torch.compile``'s guards stable across batches.

Supported: transformers' Llama and Qwen2 attention and MLP with plain ``nn.Linear`` projections
(the shapes of the GPU benchmarks and of most open 0.5–8B decoders). A LoRA-wrapped or quantized
projection, or another architecture, is left as it is (its layers run unchanged). The patched
attention is transformers' (rotary embedding, cache update, attention interface, output
projection) with the three projections as one; it accepts transformers 5.x's two spellings of the
cache argument (``past_key_values`` up to 5.1x, ``cache`` after).

With a cache that carries ``fused_update_slot`` (:class:`alignment.fast_generation.GraphDecoder`
with ``fuse_cache_update``), a one-token step's rotary embedding, cache write and attention run as
one Triton kernel (:func:`alignment.triton_attention.rope_write_decode`) where it runs.

Memory: a copy of the projection weights while generating (1B in bf16: about 2 GiB; the output
projections and the LM head are copied only when their dtype is not the compute dtype).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from alignment import triton_attention

__all__ = ["FusedDecodeWeights"]

ATTENTION_CLASSES = {"LlamaAttention", "Qwen2Attention"}
MLP_CLASSES = {"LlamaMLP", "Qwen2MLP"}


def _plain(*modules) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def _weights(linears, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights (and biases) stacked along the output dimension, in ``dtype``."""
    weight = torch.cat([m.weight.detach() for m in linears]) if len(linears) > 1 else linears[0].weight.detach()
    biases = [m.bias for m in linears]
    if any(b is None for b in biases):
        if any(b is not None for b in biases):
            raise ValueError("fused projections need all biases or none")
        bias = None
    else:
        bias = torch.cat([b.detach() for b in biases])
    return weight.to(dtype), (bias.to(dtype) if bias is not None else None)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                       past_key_values=None, **kwargs):
    """transformers' Llama/Qwen2 attention with q/k/v as one matmul over ``self.fused_qkv``."""
    cache = cache if cache is not None else past_key_values
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    weight, bias, sizes, out_weight, out_bias = self.fused_qkv
    query, key, value = F.linear(hidden_states, weight, bias).split(sizes, dim=-1)
    query = query.reshape(hidden_shape).transpose(1, 2)
    key = key.reshape(hidden_shape).transpose(1, 2)
    value = value.reshape(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    slot = getattr(cache, "fused_update_slot", None)  # set by GraphDecoder for its decode steps only
    if slot is not None and query.shape[2] == 1 and triton_attention.supports_update(query, key):
        layer = cache.layers[self.layer_idx]
        # the cache's own position counter is not advanced: the decoder's slot says where to write
        out = triton_attention.rope_write_decode(query, key, value, cos, sin, layer.keys, layer.values, slot,
                                                 attention_mask[:, 0, 0, :], self.scaling)
        return F.linear(out.reshape(*input_shape, -1), out_weight, out_bias), None
    source = sys.modules[type(self).__mro__[1].__module__]  # the model's own modeling module
    query, key = source.apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)  # static layers track their own position
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                      source.eager_attention_forward)
    extra = {"sliding_window": self.sliding_window} if getattr(self, "sliding_window", None) else {}
    out, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                             **extra, **kwargs)
    return F.linear(out.reshape(*input_shape, -1), out_weight, out_bias), weights


def _mlp_forward(self, x):
    """``down(act(gate x) * up x)`` with gate and up as one matmul over ``self.fused_gate_up``."""
    weight, down_weight = self.fused_gate_up
    gate, up = F.linear(x, weight).chunk(2, dim=-1)
    return F.linear(self.act_fn(gate) * up, down_weight)


def _head_forward(self, x):
    return F.linear(x, self.fused_head, self.bias.to(self.fused_head.dtype) if self.bias is not None else None)


@functools.cache
def _fused_class(base: type, forward) -> type:
    """A subclass of ``base`` with ``forward`` (one per class, so compiled code stays valid)."""
    return type(f"Fused{base.__name__}", (base,), {"forward": forward})


class FusedDecodeWeights:
    """Compute-dtype copies of a decoder's matmul weights, q/k/v and gate/up concatenated.

    ``entries`` holds (module, attribute name, value, forward) for every module that decodes with
    fused weights; :meth:`patched` installs them. ``fused_layers`` counts the layers whose
    attention and MLP were both fused (0 when the architecture is not supported).
    """

    def __init__(self, entries: list[tuple[nn.Module, str, tuple | torch.Tensor, object]], fused_layers: int) -> None:
        self.entries = entries
        self.fused_layers = fused_layers

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, dtype: torch.dtype) -> FusedDecodeWeights:
        """Copy the weights of ``model`` (a transformers causal LM, possibly wrapped) in ``dtype``."""
        entries: list = []
        attention = mlp = 0
        for module in model.modules():
            name = type(module).__name__
            if name in ATTENTION_CLASSES and _plain(module.q_proj, module.k_proj, module.v_proj, module.o_proj):
                weight, bias = _weights([module.q_proj, module.k_proj, module.v_proj], dtype)
                sizes = (module.q_proj.out_features, module.k_proj.out_features, module.v_proj.out_features)
                out_weight, out_bias = _weights([module.o_proj], dtype)
                entries.append((module, "fused_qkv", (weight, bias, sizes, out_weight, out_bias), _attention_forward))
                attention += 1
            elif name in MLP_CLASSES and _plain(module.gate_proj, module.up_proj, module.down_proj):
                if module.gate_proj.bias is not None or module.down_proj.bias is not None:
                    continue
                weight, _ = _weights([module.gate_proj, module.up_proj], dtype)
                down, _ = _weights([module.down_proj], dtype)
                entries.append((module, "fused_gate_up", (weight, down), _mlp_forward))
                mlp += 1
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if entries and head is not None and _plain(head):
            entries.append((head, "fused_head", head.weight.detach().to(dtype), _head_forward))
        return cls(entries, min(attention, mlp))

    @contextlib.contextmanager
    def patched(self):
        """Within the block, the fused modules forward with the copies; restored on exit."""
        saved = []
        try:
            for module, attribute, value, forward in self.entries:
                saved.append((module, module.__class__))
                module.__dict__[attribute] = value
                module.__class__ = _fused_class(module.__class__, forward)
            yield self
        finally:
            for (module, original), (_, attribute, _, _) in zip(saved, self.entries, strict=False):
                module.__class__ = original
                module.__dict__.pop(attribute, None)
