"""Pair batches with the prompt computed once: ``[prompt, chosen, rejected]`` in one segment.

A preference pair's two sequences, ``prompt + chosen`` and ``prompt + rejected``, share the
prompt; the plain layout (:func:`alignment.batching.collate_sequences`) runs it through the model
twice. Here each pair is one *group* of ``P + C + R`` tokens instead of ``2P + C + R``, with an
attention mask that lets

* prompt tokens see the earlier prompt tokens (causal),
* chosen tokens see the prompt and the earlier chosen tokens,
* rejected tokens see the prompt and the earlier rejected tokens (never the chosen ones),

and position ids ``0..P+C-1`` for prompt and chosen, ``P..P+R-1`` for rejected. Every hidden
state is then the one the plain layout computes (the same inputs, positions and visible keys;
only the float summation order may differ), so log-probs, rewards and their gradients are the
plain path's. The first rejected token is predicted from the last prompt token's hidden state,
which both responses share.

It saves ``P / (2P + C + R)`` of the decoder's tokens, in the matrix products and in attention.
Groups are packed first-fit decreasing into rows as wide as the longest group (``packing``), or
one group per right-padded row. The mask is built on the model's device from two small
``[R, T]`` id tensors (``share_group``, ``share_segment``), never shipped as ``[R, T, T]``.

Batch keys are those of :mod:`alignment.batching` (sequences ``0..B-1`` chosen, ``B..2B-1``
rejected) except ``labels`` (a shared prompt position has two next tokens) and ``cu_seq_lens``;
``num_tokens`` still counts the plain layout's tokens (the data trained on, as the plain and
TRL's counters do), ``num_model_tokens`` the tokens the model ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alignment.row_packing import first_fit_decreasing, row_width

PROMPT, CHOSEN, REJECTED = 0, 1, 2
"""``share_segment`` values."""


def collate_shared_prompt(
    prompts: Sequence[list[int]], chosen: Sequence[list[int]], rejected: Sequence[list[int]], *, pad_id: int,
    packing: bool = True, pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Pairs → one batch of ``[prompt, chosen, rejected]`` groups (module docstring)."""
    n = len(prompts)
    lengths = [len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    width = row_width(lengths, pad_to_multiple_of)
    members = first_fit_decreasing(lengths, width) if packing else [[i] for i in range(n)]
    ids, pos, group, segment = [], [], [], []
    target_index: list[list[int]] = [[] for _ in range(2 * n)]
    target_ids: list[list[int]] = [[] for _ in range(2 * n)]
    last_index = [0] * (2 * n)
    for r, idx in enumerate(members):
        row_ids, row_pos, row_group, row_seg = [], [], [], []
        for i in idx:
            p, c, rj = prompts[i], chosen[i], rejected[i]
            base = r * width + len(row_ids)
            P, C, R = len(p), len(c), len(rj)
            row_ids += [*p, *c, *rj]
            row_pos += [*range(P + C), *range(P, P + R)]
            row_group += [i] * (P + C + R)
            row_seg += [PROMPT] * P + [CHOSEN] * C + [REJECTED] * R
            # Position t of a sequence predicts its token t+1; with no prompt the first
            # response token has no predictor (as in the plain layout).
            first = 0 if P else 1
            target_index[i] = [base + P + j - 1 for j in range(first, C)]
            target_ids[i] = list(c[first:])
            target_index[n + i] = [base + (P - 1 if j == 0 else P + C + j - 1) for j in range(first, R)]
            target_ids[n + i] = list(rj[first:])
            last_index[i] = base + P + C - 1
            last_index[n + i] = base + (P + C + R - 1 if R else P - 1)
        tail = width - len(row_ids)  # padding: a group of its own, never a target
        row_ids += [pad_id] * tail
        row_pos += list(range(tail))
        row_group += [-1 - r] * tail
        row_seg += [PROMPT] * tail
        ids.append(row_ids)
        pos.append(row_pos)
        group.append(row_group)
        segment.append(row_seg)
    seq_of = [s for s in range(2 * n) for _ in target_index[s]]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
        "share_group": torch.tensor(group, dtype=torch.long),
        "share_segment": torch.tensor(segment, dtype=torch.int8),
        "target_index": torch.tensor([t for ts in target_index for t in ts], dtype=torch.long),
        "target_ids": torch.tensor([t for ts in target_ids for t in ts], dtype=torch.long),
        "target_seq": torch.tensor(seq_of, dtype=torch.long),
        "last_index": torch.tensor(last_index, dtype=torch.long),
        "num_sequences": 2 * n,
        "num_tokens": sum(lengths) + sum(len(p) for p in prompts),  # the plain layout runs each prompt twice
        "num_model_tokens": sum(lengths),
    }


def shared_prompt_mask(group: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[R, 1, T, T]`` (True = may attend) from ``share_group`` and
    ``share_segment`` ``[R, T]``: causal, within a group, and a response sees only the prompt and
    itself."""
    T = group.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=group.device).tril()
    same_group = group[:, :, None] == group[:, None, :]
    visible = (segment[:, None, :] == PROMPT) | (segment[:, :, None] == segment[:, None, :])
    return (same_group & visible & causal)[:, None]
