"""Reference log-probs computed once and cached on disk.

DPO's reference model never changes, so its per-response log-probs are a pure function of
(reference weights, data, tokenization). They are computed in one no-grad pass before
training and stored as ``<cache_dir>/<key>.safetensors`` (tensors ``index``, ``chosen``,
``rejected``, fp32), where the key joins three digests:

* model — :func:`alignment.models.model_fingerprint` (weight bytes of a local folder, or hub
  id + revision; dtype) plus the autocast precision;
* data — :func:`rows_digest` of the raw rows;
* tokenization — :func:`tokenization_digest` of the token ids actually fed to the model (so a
  changed tokenizer, chat template or truncation limit is a different key).

A later run with the same three digests loads the file and does no reference forward at all.
Writes go to a temporary name and are renamed, so concurrent or interrupted runs never leave a
torn file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alignment.batching import pair_halves, to_device


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def rows_digest(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = ("prompt", "is_chat", "chosen", "rejected")) -> str:
    """Digest of the given columns of every row, in order."""
    return _digest(json.dumps([row.get(c) for c in columns], default=str) for row in rows)


def tokenization_digest(examples: Sequence[Mapping[str, Any]]) -> str:
    """Digest of each example's row index and prompt/chosen/rejected token ids, in order."""
    return _digest(
        json.dumps([e["index"], e["prompt"], e["chosen"], e["rejected"]]) for e in examples
    )


def cache_key(model_digest: str, data_digest: str, tok_digest: str) -> str:
    """File stem of a cache entry: the three digests joined."""
    return f"ref-{model_digest}-{data_digest}-{tok_digest}"


class RefLogpsCache:
    """A folder of cached reference log-probs; see the module docstring."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(chosen, rejected) for ``indices``, or None when absent or written for other examples."""
        path = self.path(key)
        if not path.exists():
            return None
        data = load_file(str(path))
        if data["index"].tolist() != list(indices):
            return None
        return data["chosen"], data["rejected"]

    def save(self, key: str, indices: Sequence[int], chosen: torch.Tensor, rejected: torch.Tensor) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tensors = {"index": torch.tensor(list(indices), dtype=torch.long),
                   "chosen": chosen.float().cpu().contiguous(), "rejected": rejected.float().cpu().contiguous()}
        save_file(tensors, str(tmp), metadata={"key": key})
        tmp.replace(path)
        return path


@torch.no_grad()
def compute_reference_logps(
    logps_fn: Callable[[dict[str, Any]], torch.Tensor],
    examples: Sequence[Mapping[str, Any]],
    collate: Callable[[list[Mapping[str, Any]]], dict[str, Any]],
    device: torch.device,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Run ``logps_fn`` (batch → per-sequence summed log-probs, read per pair by
    :func:`~alignment.batching.pair_halves`) over ``examples`` in order; returns (chosen ``[n]``,
    rejected ``[n]``, forwards run)."""
    chosen, rejected, forwards = [torch.zeros(0)], [torch.zeros(0)], 0  # empty data -> empty tensors
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(list(examples[start : start + batch_size])), device)
        c, r = pair_halves(logps_fn(batch).float(), batch)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
        forwards += 1
    return torch.cat(chosen), torch.cat(rejected), forwards


def attach(examples: Sequence[dict[str, Any]], chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    """Store ``ref_chosen`` / ``ref_rejected`` on each example (collate_pairs passes them on)."""
    for ex, c, r in zip(examples, chosen.tolist(), rejected.tolist(), strict=True):
        ex["ref_chosen"], ex["ref_rejected"] = c, r
