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

**Response groups** (:func:`collate_response_groups`, the pair recipes' ``share_responses``) are
the same layout with K responses after a prompt instead of two: the batch's distinct prompts each
run once, and each distinct response of a prompt once, response k under segment k + 1 (seeing
the prompt and itself). Pairs name their two sequences (``pair_chosen``, ``pair_rejected``). K
responses compared in all their K(K-1)/2 pairs then run one prompt and one copy of each response,
where shared-prompt pairs run K(K-1)/2 prompts and K-1 copies of each response (the plain layout
K(K-1) prompts). :func:`collate_groups` builds both; the pair layout is its K = 2 case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from alignment.row_packing import first_fit_decreasing, row_width

PROMPT = 0
"""``share_segment`` of prompt tokens (and padding); response k of a group has k + 1 (chosen 1, rejected 2)."""


def collate_shared_prompt(
    prompts: Sequence[list[int]], chosen: Sequence[list[int]], rejected: Sequence[list[int]], *, pad_id: int,
    packing: bool = True, pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Pairs → one batch of ``[prompt, chosen, rejected]`` groups (module docstring): pair i's chosen
    is sequence i, its rejected sequence n + i."""
    n = len(prompts)
    batch = collate_groups(prompts, [[c, r] for c, r in zip(chosen, rejected, strict=True)],
                           [[i, n + i] for i in range(n)], pad_id=pad_id, packing=packing,
                           pad_to_multiple_of=pad_to_multiple_of)
    batch["num_tokens"] = batch["num_model_tokens"] + sum(len(p) for p in prompts)  # the plain layout runs each prompt twice
    return batch


def collate_response_groups(
    prompts: Sequence[list[int]], chosen: Sequence[list[int]], rejected: Sequence[list[int]], *, pad_id: int,
    packing: bool = True, pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Pairs → one batch in which each distinct prompt runs once and each distinct response of a
    prompt once: a group ``[prompt, response_1, ..., response_K]`` per prompt, every response seeing
    only the prompt and itself (:func:`shared_prompt_mask`), so each response's hidden states are
    those of ``prompt + response`` alone. Pairs that share a response (a ranking of K responses
    compared in all its K(K-1)/2 pairs) then cost the tokens of the K responses, not of 2 per pair.

    Sequences are the distinct (prompt, response) token lists, numbered in order of first
    appearance; ``pair_chosen`` and ``pair_rejected`` ``[B]`` give each pair's two sequences.
    ``num_tokens`` counts the plain layout's tokens (2 prompts and 2 responses per pair: the data
    trained on), ``num_model_tokens`` the tokens the model ran. A pair whose two responses are the
    same tokens points both at one sequence (its margin is 0).
    """
    group_of: dict[tuple[int, ...], int] = {}
    seq_of: dict[tuple[int, tuple[int, ...]], int] = {}
    g_prompts: list[list[int]] = []
    g_responses: list[list[list[int]]] = []
    g_ids: list[list[int]] = []
    pairs: tuple[list[int], list[int]] = ([], [])
    for prompt, pair in zip(prompts, zip(chosen, rejected, strict=True), strict=True):
        key = tuple(prompt)
        g = group_of.get(key)
        if g is None or len(g_ids[g]) + 2 > MAX_RESPONSES:  # a new group (segment ids are int8)
            g = group_of[key] = len(g_prompts)
            g_prompts.append(list(prompt))
            g_responses.append([])
            g_ids.append([])
        for response, out in zip(pair, pairs, strict=True):
            skey = (g, tuple(response))
            s = seq_of.get(skey)
            if s is None:
                s = seq_of[skey] = len(seq_of)
                g_responses[g].append(list(response))
                g_ids[g].append(s)
            out.append(s)
    batch = collate_groups(g_prompts, g_responses, g_ids, pad_id=pad_id, packing=packing,
                           pad_to_multiple_of=pad_to_multiple_of)
    batch["pair_chosen"] = torch.tensor(pairs[0], dtype=torch.long)
    batch["pair_rejected"] = torch.tensor(pairs[1], dtype=torch.long)
    batch["num_tokens"] = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True))
    return batch


MAX_RESPONSES = 100
"""Most responses in one group (``share_segment`` is int8); a prompt with more starts another group."""


def collate_groups(
    prompts: Sequence[list[int]], responses: Sequence[Sequence[list[int]]], seq_ids: Sequence[Sequence[int]], *,
    pad_id: int, packing: bool = True, pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Groups ``[prompt, response_1, ..., response_K]`` → one batch (module docstring, with K responses
    instead of two): response k of group g is sequence ``seq_ids[g][k]``; the ids must number the
    sequences 0..S-1. Response k has segment k + 1 and positions ``P..P+len-1``; its first token is
    predicted from the prompt's last token."""
    n = sum(len(ids) for ids in seq_ids)
    lengths = [len(p) + sum(len(r) for r in rs) for p, rs in zip(prompts, responses, strict=True)]
    width = row_width(lengths, pad_to_multiple_of)
    members = first_fit_decreasing(lengths, width) if packing else [[i] for i in range(len(prompts))]
    ids, pos, group, segment = [], [], [], []
    target_index: list[list[int]] = [[] for _ in range(n)]
    target_ids: list[list[int]] = [[] for _ in range(n)]
    last_index = [0] * n
    for r, idx in enumerate(members):
        row_ids, row_pos, row_group, row_seg = [], [], [], []
        for g in idx:
            p = prompts[g]
            base = r * width + len(row_ids)
            P = len(p)
            row_ids += p
            row_pos += range(P)
            row_group += [g] * P
            row_seg += [PROMPT] * P
            # Position t of a sequence predicts its token t+1; with no prompt the first
            # response token has no predictor (as in the plain layout).
            first = 0 if P else 1
            offset = P
            for k, (resp, s) in enumerate(zip(responses[g], seq_ids[g], strict=True)):
                L = len(resp)
                row_ids += resp
                row_pos += range(P, P + L)
                row_group += [g] * L
                row_seg += [k + 1] * L
                target_index[s] = [base + (P - 1 if j == 0 else offset + j - 1) for j in range(first, L)]
                target_ids[s] = list(resp[first:])
                last_index[s] = base + (offset + L - 1 if L else P - 1)
                offset += L
        tail = width - len(row_ids)  # padding: a group of its own, never a target
        row_ids += [pad_id] * tail
        row_pos += list(range(tail))
        row_group += [-1 - r] * tail
        row_seg += [PROMPT] * tail
        ids.append(row_ids)
        pos.append(row_pos)
        group.append(row_group)
        segment.append(row_seg)
    seq_of = [s for s in range(n) for _ in target_index[s]]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
        "share_group": torch.tensor(group, dtype=torch.long),
        "share_segment": torch.tensor(segment, dtype=torch.int8),
        "target_index": torch.tensor([t for ts in target_index for t in ts], dtype=torch.long),
        "target_ids": torch.tensor([t for ts in target_ids for t in ts], dtype=torch.long),
        "target_seq": torch.tensor(seq_of, dtype=torch.long),
        "last_index": torch.tensor(last_index, dtype=torch.long),
        "num_sequences": n,
        "num_tokens": sum(lengths),
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
