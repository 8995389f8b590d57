"""The model side of RL: reward functions, per-target log-probs and values, and a rollout's samples.

Log-probs are of the *sampling* distribution: logits divided by ``generation.temperature``
(top-k/top-p truncation is ignored, as usual). Tokens are scored in the layout of
:mod:`alignment.batching` (prompt + response, targets = response tokens, EOS included), so the
per-token tensors of a batch are flat ``[N]`` in (sample, position) order; ``Rollout.mask``
``[B, R]`` maps them to a right-padded grid for GAE and back (``grid[mask] = flat``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from alignment.batching import Prompt, collate_sequences, to_device
from alignment.logprobs import logps_from_hidden, selective_log_softmax
from alignment.losses import entropy_from_logits
from alignment.models import decoder_hidden, hf_model, hidden_path_ok

__all__ = ["PolicyModule", "RewardFn", "Rollout", "disable_dropout", "load_reward_fn", "response_forward",
           "token_scores"]

RewardFn = Callable[[list[Prompt], list[str]], Sequence[float]]


def load_reward_fn(spec: str) -> RewardFn:
    """Import ``"package.module:function"``. Raises ValueError naming what is wrong."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"reward_fn must look like 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward_fn {spec!r} cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"reward_fn {spec!r} is not callable")
    return fn


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (modules and the attention-dropout config field)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(hf_model(model), "config", None)
    if config is not None and getattr(config, "attention_dropout", None):
        config.attention_dropout = 0.0


def _entropy_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    return entropy_from_logits(F.linear(hidden, weight, bias) / temperature, chunk_size=None)


def response_forward(
    model: nn.Module,
    batch: dict[str, Any],
    chunk_size: int,
    temperature: float,
    *,
    with_hidden: bool = False,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-target log-probs ``[N]`` (fp32) of a causal LM on a collated batch; optionally the
    hidden states ``[N, H]`` that predict each target (for a value head) and the per-target
    entropy ``[N]`` of the tempered distribution (block by block; differentiable only with
    ``entropy_grad``, i.e. when an entropy bonus is in the loss)."""
    inner = hf_model(model)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
              "attention_mask": batch.get("attention_mask"), "use_cache": False}
    index, targets = batch["target_index"], batch["target_ids"]
    out: dict[str, torch.Tensor] = {}
    if hidden_path_ok(model):
        head = inner.get_output_embeddings()
        hidden = inner.base_model(**inputs).last_hidden_state.flatten(0, 1).index_select(0, index)
        out["token_logps"] = logps_from_hidden(hidden[None], head.weight, targets[None], None, chunk_size,
                                               lm_head_bias=head.bias, temperature=temperature)[0]
        if with_entropy:
            parts = []
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                for s in range(0, hidden.shape[0], chunk_size):
                    h = hidden[s : s + chunk_size]
                    if torch.is_grad_enabled():  # recompute each block in backward instead of keeping it
                        parts.append(checkpoint(_entropy_chunk, h, head.weight, head.bias, temperature,
                                                use_reentrant=False))
                    else:
                        parts.append(_entropy_chunk(h, head.weight, head.bias, temperature))
            out["entropy"] = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    else:
        result = model(**inputs, output_hidden_states=with_hidden)
        logits = result.logits.flatten(0, 1).index_select(0, index)
        out["token_logps"] = selective_log_softmax(logits[None], targets[None], chunk_size, temperature=temperature)[0]
        if with_hidden:
            hidden = result.hidden_states[-1].flatten(0, 1).index_select(0, index)
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                out["entropy"] = entropy_from_logits(logits / temperature, chunk_size)
    if with_hidden:
        out["hidden"] = hidden
    return out


def token_scores(reward_model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Per-target scores ``[N]`` (fp32) of a decoder reward model with a ``score`` head on a
    collated batch: the head applied to the hidden state *of* each target token (position
    ``target_index + 1``, the token itself, where the policy's log-prob is read one position
    earlier). For a ``sum``-pooled reward model (bias-free head) these are the terms of its
    sequence score: the scores of a response's tokens without its EOS sum to
    :class:`alignment.models.ScalarReward`'s output on that response."""
    inner = hf_model(reward_model)
    picked = decoder_hidden(inner, batch).flatten(0, 1).index_select(0, batch["target_index"] + 1)
    return inner.score(picked).squeeze(-1).float()


class PolicyModule(nn.Module):
    """The trained module handed to ``accelerate``: the policy plus, for PPO, a value function.

    ``forward(batch, with_entropy=False, entropy_grad=False, detach_value_input=False) ->
    {"token_logps" [N], "values" [N]?, "entropy" [N]?}`` (see :func:`response_forward`);
    ``detach_value_input`` stops the value loss's gradient at the value head's input (the shared
    trunk is left alone: a value warm-up that does not move the policy).
    The value is a linear head on the policy's last hidden state (``value_head``) or a
    separate sequence-classification model whose score head is applied at every position
    (``value_model``); V at a target is the value of the state that emits it.
    """

    def __init__(self, policy: nn.Module, chunk_size: int, temperature: float, *,
                 value_head: nn.Module | None = None, value_model: nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.value_model = value_model
        self.chunk_size = chunk_size
        self.temperature = temperature

    def forward(self, batch: dict[str, Any], with_entropy: bool = False,
                entropy_grad: bool = False, detach_value_input: bool = False) -> dict[str, torch.Tensor]:
        out = response_forward(self.policy, batch, self.chunk_size, self.temperature,
                               with_hidden=self.value_head is not None, with_entropy=with_entropy,
                               entropy_grad=entropy_grad)
        if self.value_head is not None:
            hidden = out.pop("hidden")
            if detach_value_input:
                hidden = hidden.detach()
            out["values"] = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        elif self.value_model is not None:
            inner = hf_model(self.value_model)
            hidden = inner.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                      attention_mask=batch.get("attention_mask"), use_cache=False).last_hidden_state
            picked = hidden.flatten(0, 1).index_select(0, batch["target_index"])
            out["values"] = inner.score(picked).squeeze(-1).float()
        return out


@dataclass
class Rollout:
    """Sampled responses of one step and their scores; per-token tensors are filled by the recipe."""

    prompts: list[Prompt]
    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]
    texts: list[str]
    hit_eos: torch.Tensor
    """[B] bool, on the device."""
    raw_scores: torch.Tensor
    """[B] fp32 reward-model / reward_fn output."""
    scores: torch.Tensor
    """[B] fp32 score used for training (raw minus the missing-EOS penalty, then ``reward_norm``)."""
    mask: torch.Tensor
    """[B, R] long, 1 on response tokens (right-padded), on the device."""
    generate_s: float

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_tokens(self) -> int:
        return sum(len(p) + len(r) for p, r in zip(self.prompt_tokens, self.response_tokens, strict=True))

    def collate(self, rows: Sequence[int], layout: dict[str, Any], device: torch.device) -> dict[str, Any]:
        batch = collate_sequences([self.prompt_tokens[i] for i in rows], [self.response_tokens[i] for i in rows],
                                  **layout)
        return to_device(batch, device)

    def to_grid(self, flat: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Flat per-target values of ``rows`` (all rows when None) → ``[len(rows), R]``, 0 at padding."""
        mask = self.mask if rows is None else self.mask[list(rows)]
        grid = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
        grid[mask.bool()] = flat
        return grid
