"""Evaluation samples kept between rounds (the on-disk layout of ``<home>/cache/eval-samples``).

A round's evaluation samples three models on the same held-out prompts with the same seed: the
candidate, the champion and the reference. The reference is the same model every round, and the
champion was an earlier round's candidate, so two of the three are sampled, scored and decoded
greedily exactly as before. :func:`load` and :func:`save` keep what
:func:`tasks.evaluation.suite.evaluate_models` computes per model from its samples alone: the
responses (token ids, masks, EOS flags, texts), their log-probs under the model and under the
reference (at the sampling temperature and, for the fluency figure, at 1) and the greedy
responses. Scores that change with the round (the round's reward model) are recomputed; the oracle
is cheap and recomputed too.

Layout: ``<dir>/<key>.safetensors`` (tensors) and ``<key>.json`` (format, texts, pad id, greedy
texts), each written to a temporary name and renamed, the JSON last: an entry
without its JSON is incomplete and is ignored (a crash mid-write leaves no half entry that
loads). No pickles: safetensors and JSON only.

Key (:func:`sample_key`): SHA-256 over the identity of the model and of the reference, their
content (the project's model-folder digest of config and weights, :func:`alignment.models.folder_digest`,
remembered under ``<dir>/fingerprints`` so a folder's weights are read once, and the SHA-256 of
each other top-level file: tokenizer, chat template): a retrained model in the same folder is
another model, and the registry's copy of a round's candidate, which comes back as the next
round's champion from another folder, is the same one. Then the tokenizer setting, the prompts, every
evaluation setting that shapes the samples or their log-probs (generation settings, seed,
prompt truncation, scoring batch size, temperature), the greedy prompts, the device and the
torch and transformers versions (kernels differ between them). A model that is not a local
folder (a hub id) gets no key and is never cached. Resume semantics: an entry is only read
when every one of those is equal, so a cached bundle is the bundle the evaluation would compute.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

from alignment.generation import GenerationResult
from alignment.models import folder_digest

FORMAT = 2  # 2: folders identified by content (1: by path and modification time)
_TENSORS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "hit_eos")
_ARRAYS = ("logps", "ref_logps", "fluency_logps")


def _folder_identity(path: str | Path, memo_dir: Path | None) -> list | None:
    """A local model folder's content, not where it lies (else None): its config and weights by
    :func:`alignment.models.folder_digest` (remembered in ``memo_dir`` while their sizes and mtimes
    hold), and every other top-level file but weights (tokenizer, chat template), small, by SHA-256."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    small = [f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix not in {".safetensors", ".bin"}]
    return [folder_digest(folder, memo_dir), [(f.name, _sha256(f)) for f in small]]


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sample_key(model: str | Path, reference: str | Path, *, prompts: list, greedy_prompts: list | None,
               settings: dict[str, Any], device: str, reference_tokenizer: str | None = None,
               chat_template: str | None = None, memo_dir: Path | None = None) -> str | None:
    """The cache key of ``model``'s samples against ``reference`` (hex), or None when either is
    not a local folder. ``settings``: the evaluation settings that shape the samples (JSON-able);
    ``reference_tokenizer`` and ``chat_template``: the policies' tokenizer and chat template when the
    config sets them; ``memo_dir``: where the weights' digests are remembered (the cache folder; None: hashed each time)."""
    ident, ref = _folder_identity(model, memo_dir), _folder_identity(reference, memo_dir)
    if ident is None or ref is None:
        return None
    parts = {"format": FORMAT, "model": ident, "reference": ref, "tokenizer": reference_tokenizer,
             "prompts": prompts, "greedy_prompts": greedy_prompts, "settings": settings,
             "device": device, "torch": torch.__version__, "transformers": transformers.__version__}
    if chat_template is not None:  # absent otherwise: the keys of runs without one stay what they were
        parts["chat_template"] = chat_template
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def load(folder: Path, key: str) -> dict[str, Any] | None:
    """The cached bundle ``{"gen", "logps", "ref_logps", "fluency_logps", "greedy"}``, or None when
    there is no complete entry (or it cannot be read: it is then recomputed and rewritten)."""
    meta_path, tensor_path = folder / f"{key}.json", folder / f"{key}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(tensor_path))
        gen = GenerationResult(*(tensors[name] for name in _TENSORS), texts=list(meta["texts"]),
                               pad_token_id=int(meta["pad_token_id"]))
        arrays = {name: tensors[name].numpy() if name in tensors else None for name in _ARRAYS}
    except Exception:  # any unreadable entry (truncated, garbage, another format) is recomputed, never fatal
        return None
    return {"gen": gen, **arrays, "greedy": meta.get("greedy")}


def _write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(folder: Path, key: str, gen: GenerationResult, logps: np.ndarray, ref_logps: np.ndarray,
         fluency_logps: np.ndarray | None, greedy: list[str] | None) -> None:
    """Write one model's bundle (tensors first, then the JSON that completes the entry)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(gen, name).contiguous().clone() for name in _TENSORS}
    for name, array in zip(_ARRAYS, (logps, ref_logps, fluency_logps), strict=True):
        if array is not None:
            tensors[name] = torch.tensor(np.asarray(array, dtype=np.float64))  # a copy: arrays may be one object
    _write(folder / f"{key}.safetensors", lambda tmp: save_file(tensors, tmp))
    meta = {"format": FORMAT, "texts": gen.texts, "pad_token_id": gen.pad_token_id, "greedy": greedy}
    _write(folder / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta)))
