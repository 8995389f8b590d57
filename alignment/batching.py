"""From Parquet rows to model-ready batches: prompts, truncation, collation, length grouping, packing.

Token layout (every collator returns it, padded or packed)
---------------------------------------------------------
* ``input_ids``, ``position_ids``: ``[R, T]``; ``attention_mask``: ``[R, T]`` when padded
  (right padding, one sequence per row) or absent when packed (sequences concatenated, first
  fit decreasing, into rows as wide as the longest one; ``position_ids`` restart at 0 for each:
  transformers then builds a block-diagonal causal mask, or uses variable-length kernels with
  flash/flex attention). A row's unused tail is padding in a segment of its own. With
  ``one_row`` (packed, for variable-length attention, which flattens the rows anyway) every
  sequence goes into a single row ``[1, T]``, ``T`` the total rounded up to
  ``pad_to_multiple_of``: no row tails to compute, and the compiled layers see one batch size.
* ``labels``: ``[R, T]`` next-token targets **already shifted**: ``labels[r, t]`` is the token
  the hidden state at ``(r, t)`` must predict, or -100. Only completion tokens are targets
  (never the prompt, never padding, never across a packed boundary).
* ``target_index``, ``target_ids``, ``target_seq``: ``[N]`` the same N targets flat: position in
  the flattened ``R*T`` grid, token id, and sequence number (0..S-1). Computed here on the CPU so
  the device never waits on a data-dependent mask.
* ``last_index``: ``[S]`` flat index (into ``R*T``) of each sequence's last token (reward pooling).
* ``cu_seq_lens`` (int32 ``[segments + 1]``) and ``max_seq_len`` (packed only): boundaries of
  every segment of the flattened ``R*T`` stream and the longest, for variable-length attention.
* ``num_sequences``: S. Pair batches hold chosen sequences 0..B-1 and rejected B..2B-1, so both
  responses go through the model in one forward pass.

Truncation: the prompt keeps its **end** (the part next to the response) up to
``max_prompt_length`` (a leading BOS is kept); the completion keeps its start up to
``max_length`` minus the prompt. With ``truncation="drop"`` over-long examples are skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignment.logprobs import IGNORE_INDEX
from alignment.prompt_sharing import collate_response_groups, collate_shared_prompt
from alignment.row_packing import first_fit_decreasing, row_width

Prompt = str | list[dict[str, Any]]


# ---------------------------------------------------------------------------- rows and prompts
def decode_prompt(row: Mapping[str, Any]) -> Prompt:
    """A stored row's prompt as the library takes it: a string, or a chat message list when
    ``is_chat`` is true (stored as the JSON text of ``[{"role": ..., "content": ...}, ...]``).

    Raises ValueError when the chat JSON does not parse or is not a list of role/content dicts.
    """
    prompt = row["prompt"]
    if not row.get("is_chat", False):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string when is_chat is false, got {type(prompt).__name__}")
        return prompt
    messages = json.loads(prompt) if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
    ):
        raise ValueError("a chat prompt must be a JSON list of {'role', 'content'} messages")
    return [dict(m) for m in messages]


def read_rows(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a Parquet file, a folder of Parquet files, or a saved ``datasets.Dataset`` folder.

    Raises FileNotFoundError for a missing path and ValueError naming missing columns.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir() and (path / "dataset_info.json").exists():
        import datasets

        rows = datasets.load_from_disk(str(path)).to_list()
        columns = set(rows[0]) if rows else set()
    else:
        import pyarrow.parquet as pq

        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        tables = [pq.read_table(f) for f in files]
        columns = set(tables[0].column_names) if tables else set()
        rows = [r for t in tables for r in t.to_pylist()]
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {sorted(columns)}")
    return rows


def _text(row: Mapping[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: column {key!r} must be a non-empty string, got {value!r}")
    return value


def _number(row: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = row.get(key, default)
    value = default if value is None else float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: column {key!r} must be a finite number >= 0, got {value!r}")
    return value


# ---------------------------------------------------------------------------- tokenization
def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: chat lists through the tokenizer's chat template (with the
    generation prompt), plain text with the tokenizer's special tokens (e.g. BOS). Never empty:
    an empty prompt becomes ``[bos]`` (or ``[eos]``) so the first response token has a context.

    Raises ValueError for a chat prompt when the tokenizer has no chat template.
    """
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat prompt given but the tokenizer has no chat template; set the model's chat_template "
                             "(chatml, or a Jinja template) or use plain prompts")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return list(ids)


def encode_completion(tokenizer, text: str, append_eos: bool) -> list[int]:
    """Token ids of a response (no special tokens), plus EOS when ``append_eos``."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


@dataclass(frozen=True)
class Truncation:
    """How over-long examples are shortened (see the module docstring)."""

    max_length: int
    max_prompt_length: int
    mode: str = "truncate"
    bos_token_id: int | None = None

    def apply(self, prompt: list[int], completions: list[list[int]]) -> tuple[list[int], list[list[int]]] | None:
        """Truncated (prompt, completions), or None when ``mode == "drop"`` and it does not fit."""
        too_long = len(prompt) > self.max_prompt_length or any(
            len(prompt) + len(c) > self.max_length for c in completions
        )
        if not too_long:
            return prompt, completions
        if self.mode == "drop":
            return None
        if len(prompt) > self.max_prompt_length:
            keep_bos = self.bos_token_id is not None and prompt[0] == self.bos_token_id
            tail = prompt[len(prompt) - (self.max_prompt_length - keep_bos) :]
            prompt = ([prompt[0]] if keep_bos else []) + tail
        room = self.max_length - len(prompt)
        return prompt, [c[:room] for c in completions]


@dataclass
class ExampleSet:
    """Tokenized examples plus the collate function that turns a list of them into a batch.

    Each example is a dict with at least ``index`` (its row in the source table) and
    ``num_tokens`` (tokens it puts through the model, for length grouping). ``stats`` counts
    ``truncated`` and ``dropped`` examples.
    """

    examples: list[dict[str, Any]]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [e["num_tokens"] for e in self.examples]


def tokenize_pairs(
    tokenizer, rows: Sequence[Mapping[str, Any]], trunc: Truncation, *, append_eos: bool = True,
    with_margin: bool = False, source: str = "pairs",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Preference rows (``prompt, is_chat, chosen, rejected`` [, ``weight``, ``margin``]) →
    examples ``{index, prompt, chosen, rejected, weight[, margin], num_tokens}`` and stats.

    Raises ValueError naming the row and column of a bad value.
    """
    out, stats = [], {"truncated": 0, "dropped": 0}
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        prompt = encode_prompt(tokenizer, decode_prompt(row))
        chosen = encode_completion(tokenizer, _text(row, "chosen", where), append_eos)
        rejected = encode_completion(tokenizer, _text(row, "rejected", where), append_eos)
        cut = trunc.apply(prompt, [chosen, rejected])
        if cut is None:
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut != (prompt, [chosen, rejected])
        prompt, (chosen, rejected) = cut
        ex = {"index": i, "prompt": prompt, "chosen": chosen, "rejected": rejected,
              "weight": _number(row, "weight", where, 1.0),
              "num_tokens": 2 * len(prompt) + len(chosen) + len(rejected)}
        if with_margin:
            if row.get("margin") is None:
                raise ValueError(f"{where}: margin is enabled but column 'margin' is missing or empty")
            ex["margin"] = float(row["margin"])
        out.append(ex)
    return out, stats


def tokenize_demonstrations(
    tokenizer, rows: Sequence[Mapping[str, Any]], trunc: Truncation, *, response_key: str = "response",
    source: str = "demonstrations",
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows with ``prompt, is_chat`` and ``response_key`` → ``{index, prompt, completion, weight, num_tokens}``."""
    out, stats = [], {"truncated": 0, "dropped": 0}
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        prompt = encode_prompt(tokenizer, decode_prompt(row))
        completion = encode_completion(tokenizer, _text(row, response_key, where), append_eos=True)
        cut = trunc.apply(prompt, [completion])
        if cut is None:
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut != (prompt, [completion])
        prompt, (completion,) = cut
        out.append({"index": i, "prompt": prompt, "completion": completion,
                    "weight": _number(row, "weight", where, 1.0), "num_tokens": len(prompt) + len(completion)})
    return out, stats


# ---------------------------------------------------------------------------- collation
def collate_sequences(
    prompts: Sequence[list[int]], completions: Sequence[list[int]], *, pad_id: int, packing: bool = False,
    pad_to_multiple_of: int | None = None, one_row: bool = False,
) -> dict[str, Any]:
    """Sequences ``prompt + completion`` in the token layout of the module docstring
    (``one_row`` applies to packed batches only)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    n = len(seqs)
    lengths = [len(s) for s in seqs]
    one_row = one_row and packing
    width = row_width([sum(lengths)] if one_row else lengths, pad_to_multiple_of)
    if packing:
        rows, position_ids, offsets, row_of = [], [], [0] * n, [0] * n
        members = [list(range(n))] if one_row else first_fit_decreasing(lengths, width)
        for r, idx in enumerate(members):
            row, pos = [], []
            for i in idx:
                offsets[i], row_of[i] = len(row), r
                row.extend(seqs[i])
                pos.extend(range(len(seqs[i])))
            tail = width - len(row)  # its own segment (positions restart), never a target
            rows.append(row + [pad_id] * tail)
            position_ids.append(pos + list(range(tail)))
    else:
        rows = [s + [pad_id] * (width - len(s)) for s in seqs]
        offsets, row_of = [0] * n, list(range(n))
        position_ids = [list(range(width))] * n
    labels = [[IGNORE_INDEX] * width for _ in rows]
    target_index, target_ids, target_seq, last_index = [], [], [], []
    for i, (s, p) in enumerate(zip(seqs, prompts, strict=True)):
        r, o = row_of[i], offsets[i]
        first = max(len(p), 1)  # position t predicts token t+1; only completion tokens are targets
        labels[r][o + first - 1 : o + len(s) - 1] = s[first:]
        start = r * width + o + first - 1
        target_index.extend(range(start, start + len(s) - first))
        target_ids.extend(s[first:])
        target_seq.extend([i] * (len(s) - first))
        last_index.append(r * width + o + len(s) - 1)
    batch = {
        "input_ids": torch.tensor(rows, dtype=torch.long),
        "position_ids": torch.tensor(position_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "target_index": torch.tensor(target_index, dtype=torch.long),
        "target_ids": torch.tensor(target_ids, dtype=torch.long),
        "target_seq": torch.tensor(target_seq, dtype=torch.long),
        "last_index": torch.tensor(last_index, dtype=torch.long),
        "num_sequences": n,
        "num_tokens": sum(len(s) for s in seqs),
    }
    if packing:
        # Sequence boundaries of the flattened rows (every segment, tail padding included, starts
        # at position 0), computed here on the CPU so the varlen attention kernel needs no sync.
        flat = batch["position_ids"].flatten()
        starts = (flat == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
        batch["cu_seq_lens"] = cu
        batch["max_seq_len"] = int((cu[1:] - cu[:-1]).max())
    else:
        batch["attention_mask"] = torch.tensor(
            [[1] * len(s) + [0] * (width - len(s)) for s in seqs], dtype=torch.long
        )
    return batch


def collate_pairs(examples: Sequence[Mapping[str, Any]], *, share_prompt: bool = False,
                  share_responses: bool = False, **layout: Any) -> dict[str, Any]:
    """Pairs → one batch: chosen sequences first, then rejected (one forward for both), each
    pair's prompt once with ``share_prompt`` (:mod:`alignment.prompt_sharing`); with
    ``share_responses`` (and ``share_prompt``) each distinct prompt and each distinct response of it
    once, the pairs' sequences in ``pair_chosen`` / ``pair_rejected``
    (:func:`~alignment.prompt_sharing.collate_response_groups`); plus
    ``weight`` [B], ``index`` [B] and, when present on every example, ``margin``,
    ``ref_chosen`` and ``ref_rejected`` [B] (fp32)."""
    prompts = [e["prompt"] for e in examples]
    chosen, rejected = [e["chosen"] for e in examples], [e["rejected"] for e in examples]
    if share_prompt and share_responses:
        batch = collate_response_groups(prompts, chosen, rejected, **layout)
    elif share_prompt:
        batch = collate_shared_prompt(prompts, chosen, rejected, **layout)
    else:
        batch = collate_sequences(prompts + prompts, chosen + rejected, **layout)
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    for key in ("weight", "margin", "ref_chosen", "ref_rejected"):
        if all(key in e for e in examples):
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch


def pair_halves(values: torch.Tensor, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) ``[B]`` of a pair batch's per-sequence ``values``: the sequences
    ``pair_chosen`` / ``pair_rejected`` name (response groups, ``share_responses``), else the
    first and the second half (chosen sequences first)."""
    if "pair_chosen" in batch:
        return values[batch["pair_chosen"]], values[batch["pair_rejected"]]
    n = values.shape[0] // 2
    return values[:n], values[n:]


def collate_demonstrations(examples: Sequence[Mapping[str, Any]], **layout: Any) -> dict[str, Any]:
    """Demonstrations → one batch of ``prompt + completion`` sequences plus ``weight`` [B]."""
    batch = collate_sequences([e["prompt"] for e in examples], [e["completion"] for e in examples], **layout)
    batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a batch to ``device`` (non-blocking); other values pass through."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---------------------------------------------------------------------------- data order
class LengthGroupedSampler:
    """Seeded batches of example indices for one process, grouped by length, resumable.

    Each epoch draws a permutation from ``(seed, epoch)``; with ``group_by_length`` it sorts
    windows of ``megabatch_factor`` global batches by length (so a batch holds similar lengths
    and little padding) and shuffles the batch order. A global batch of
    ``batch_size * num_replicas`` indices is dealt out to processes by stride. The last partial
    global batch is dropped so every process steps in lock-step.

    ``groups`` (a group id per example, e.g. its prompt) keeps each group's examples next to each
    other: the permutation and the length sorting then move whole groups, a global batch is cut
    from that order (a group may straddle two batches) and dealt out in consecutive slices, so
    the examples that share a prompt mostly share a batch (what
    :func:`~alignment.prompt_sharing.collate_response_groups` needs to run a response once).

    :meth:`next_batch` walks epochs without end; :meth:`state_dict` / :meth:`load_state_dict`
    save and restore ``(epoch, position)``, so a resumed run sees exactly the batches an
    uninterrupted one would. Raises ValueError when there are fewer examples than one global batch.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, num_replicas: int = 1, rank: int = 0,
        group_by_length: bool = True, shuffle: bool = True, megabatch_factor: int = 32,
        groups: Sequence[int] | None = None,
    ) -> None:
        self.lengths = list(lengths)
        self.groups = None
        if groups is not None:  # example indices of each group, in example order
            members: dict[int, list[int]] = {}
            for i, g in enumerate(groups):
                members.setdefault(g, []).append(i)
            self.groups = list(members.values())
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.group_by_length, self.shuffle = seed, group_by_length, shuffle
        self.megabatch = batch_size * num_replicas * megabatch_factor
        self.global_batch = batch_size * num_replicas
        if len(self.lengths) < self.global_batch:
            raise ValueError(
                f"{len(self.lengths)} examples are fewer than one global batch "
                f"(batch_size {batch_size} x {num_replicas} processes)"
            )
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches per epoch for each process."""
        return len(self.lengths) // self.global_batch

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All processes' batches of ``epoch`` (each of ``batch_size * num_replicas`` indices)."""
        n = len(self.lengths)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        if self.groups is not None:
            order = self._group_order(gen)
        else:
            order = torch.randperm(n, generator=gen).tolist() if self.shuffle else list(range(n))
        if self.group_by_length and self.groups is None:
            order = [
                i for w in range(0, n, self.megabatch)
                for i in sorted(order[w : w + self.megabatch], key=lambda j: -self.lengths[j])
            ]
        batches = [order[b : b + self.global_batch] for b in range(0, len(self) * self.global_batch, self.global_batch)]
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def _group_order(self, gen: torch.Generator) -> list[int]:
        """Every example once, each group's members together: groups in seeded order, with
        ``group_by_length`` sorted by their longest member within windows of about
        ``megabatch_factor`` global batches."""
        groups = self.groups
        order = torch.randperm(len(groups), generator=gen).tolist() if self.shuffle else list(range(len(groups)))
        if self.group_by_length:
            window = max(1, round(self.megabatch * len(groups) / max(len(self.lengths), 1)))
            longest = [max(self.lengths[i] for i in g) for g in groups]
            order = [g for w in range(0, len(order), window)
                     for g in sorted(order[w : w + window], key=lambda j: -longest[j])]
        return [i for g in order for i in groups[g]]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's share of each global batch of ``epoch``."""
        if self._cached is None or self._cached[0] != epoch:
            if self.groups is None:
                mine = [b[self.rank :: self.num_replicas] for b in self.global_batches(epoch)]
            else:  # consecutive members, so a group stays on one process
                lo = self.rank * self.batch_size
                mine = [b[lo : lo + self.batch_size] for b in self.global_batches(epoch)]
            self._cached = (epoch, mine)
        return self._cached[1]

    def next_batch(self) -> list[int]:
        """The next batch of this process, moving to the next epoch when one ends."""
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        batch = self.epoch_batches(self.epoch)[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "batches_per_epoch": len(self)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore a position. Raises ValueError if the data no longer has the same number of batches."""
        if state["batches_per_epoch"] != len(self):
            raise ValueError(
                f"cannot restore the data position: the checkpoint saw {state['batches_per_epoch']} batches per "
                f"epoch, the data now gives {len(self)} (did the data change?)"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
