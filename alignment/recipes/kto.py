"""Kahneman–Tversky optimisation on unpaired responses (``prompt, is_chat, completion, label``).

Loss: :func:`alignment.losses.kto_loss` (math in its docstring), weighted by the rows' ``weight``
column when ``use_weights``. Each example is one response labelled desirable (``label`` true) or
undesirable; no pairs are needed, so thumbs without a partner response train too.

Reference point. Every example ``i`` also gets a *mismatched* partner: the completion of another
example ``j`` (a different prompt where there is one), fixed at tokenization by a seeded cycle
over the examples (TRL shifts completions by one within each batch; a fixed cycle lets the
reference log-probs of the mismatched pairs be precomputed and cached like DPO's). The batch
mean of log pi(y_j|x_i) - log pi_ref(y_j|x_i) over its mismatched pairs, detached and clamped
at 0 (averaged over processes under DDP), is the reference point z0. The mismatched pairs go
through the policy in a separate no-grad forward (``kl_estimate: false`` skips it: z0 = 0).

Reference log-probs, by ``reference`` (as for DPO): ``precomputed`` (default: one no-grad pass
of the initial policy or ``reference_model`` before training, cached by
:mod:`alignment.refcache` under ``ref_cache_dir``), ``adapter_disabled`` (LoRA only) or ``copy``.

Metrics: ``kl`` (z0), ``rewards/chosen`` / ``rewards/rejected`` (mean beta * (log pi - log
pi_ref) of the batch's desirable / undesirable responses; 0 in a batch without any),
``rewards/margin`` (their difference), ``rewards/accuracy`` (share of responses on their label's
side of z0), ``logps/chosen``, ``logps/rejected``, ``desirable_share``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from alignment.batching import (
    ExampleSet,
    Truncation,
    _number,
    _text,
    collate_sequences,
    decode_prompt,
    encode_completion,
    encode_prompt,
    read_rows,
)
from alignment.config import ConfigError, KTOConfig
from alignment.losses import kto_loss
from alignment.models import (
    CausalLMLogps,
    load_causal_lm,
    load_reference,
    load_tokenizer,
    model_fingerprint,
)
from alignment.recipes.reference import cached_or_computed, ref_cache_folder, reference_logps
from alignment.recipes.supervised import StepOutput, SupervisedRecipe
from alignment.refcache import (
    cache_key,
    compute_reference_logps,
    rows_digest,
    tokenization_digest,
)

log = logging.getLogger(__name__)

UNPAIRED_COLUMNS = ("prompt", "completion", "label")
KL_PREFIX = "kl."
"""Collated keys of the mismatched sequences (kept flat so the batch moves to the device in one go)."""


def mismatched_partners(prompt_keys: Sequence[Any], seed: int, lookback: int = 64) -> list[int]:
    """For each example, the example whose completion it is paired with to estimate the KL.

    A seeded random cycle over the examples: example ``order[k]`` takes ``order[k - 1]``, or the
    nearest earlier one in the cycle (up to ``lookback`` steps) whose prompt key differs. An
    example whose prompt every candidate shares (one prompt, or one example) takes itself.
    """
    n = len(prompt_keys)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = list(range(n))
    for k, i in enumerate(order):
        for back in range(1, min(lookback, n - 1) + 1):
            j = order[(k - back) % n]
            if prompt_keys[j] != prompt_keys[i]:
                partner[i] = j
                break
    return partner


def _label(row: Mapping[str, Any], where: str) -> bool:
    value = row.get("label")
    if not isinstance(value, bool):
        raise ValueError(f"{where}: column 'label' must be true or false, got {value!r}")
    return value


def tokenize_unpaired(tokenizer, rows: Sequence[Mapping[str, Any]], trunc: Truncation, *, seed: int = 0,
                      source: str = "unpaired") -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Unpaired rows → ``{index, prompt, completion, kl_completion, label, weight, num_tokens}`` and
    stats (``truncated``, ``dropped``, ``desirable``, ``undesirable``).

    ``kl_completion`` is the completion of the row's mismatched partner
    (:func:`mismatched_partners`, chosen among all rows before any is dropped); both completions
    are truncated to fit after the prompt. Raises ValueError naming the row and column of a bad value.
    """
    where = [f"{source} row {i}" for i in range(len(rows))]
    prompts = [decode_prompt(row) for row in rows]
    completions = [encode_completion(tokenizer, _text(row, "completion", where[i]), True) for i, row in enumerate(rows)]
    partners = mismatched_partners([repr(p) for p in prompts], seed)
    out, stats = [], {"truncated": 0, "dropped": 0, "desirable": 0, "undesirable": 0}
    for i, row in enumerate(rows):
        label = _label(row, where[i])
        prompt = encode_prompt(tokenizer, prompts[i])
        cut = trunc.apply(prompt, [completions[i], completions[partners[i]]])
        if cut is None:
            stats["dropped"] += 1
            continue
        stats["truncated"] += cut != (prompt, [completions[i], completions[partners[i]]])
        prompt, (completion, kl_completion) = cut
        stats["desirable" if label else "undesirable"] += 1
        out.append({"index": i, "prompt": prompt, "completion": completion, "kl_completion": kl_completion,
                    "label": label, "weight": _number(row, "weight", where[i], 1.0),
                    "num_tokens": 2 * len(prompt) + len(completion) + len(kl_completion)})
    return out, stats


def collate_unpaired(examples: Sequence[Mapping[str, Any]], *, kl: bool = True, **layout: Any) -> dict[str, Any]:
    """Unpaired examples → the sequences ``prompt + completion`` in the token layout of
    :mod:`alignment.batching`, plus ``label`` (bool), ``weight``, ``index`` [B], ``ref_logps`` /
    ``ref_kl_logps`` when precomputed and, with ``kl``, the mismatched sequences
    ``prompt + kl_completion`` under keys prefixed ``kl.``."""
    prompts = [e["prompt"] for e in examples]
    batch = collate_sequences(prompts, [e["completion"] for e in examples], **layout)
    if kl:
        mismatched = collate_sequences(prompts, [e["kl_completion"] for e in examples], **layout)
        batch.update({KL_PREFIX + k: v for k, v in mismatched.items()})
    batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
    batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float32)
    batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    for key in ("ref_logps", "ref_kl_logps"):
        if all(key in e for e in examples):
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return batch


def mismatched(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The mismatched sequences of a collated batch as a batch of their own."""
    return {k[len(KL_PREFIX):]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}


class KTORecipe(SupervisedRecipe):
    """KTO training of ``config.model`` on ``config.train_path`` (unpaired rows)."""

    name = "kto"
    config_class = KTOConfig
    released_on_cleanup = (*SupervisedRecipe.released_on_cleanup, "reference")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference: CausalLMLogps | None = None
        self.reference_forwards = 0
        """Reference forward passes this run did (0 when every log-prob came from the cache)."""
        self.reference_cache_hits: list[str] = []
        self._rows: dict[str, list[dict]] = {}
        self._layout: dict[str, Any] = {}

    def build_models(self) -> None:
        cfg = self.config
        if cfg.model is None:
            raise ConfigError("kto.model: a policy model is required")
        if cfg.reference == "adapter_disabled" and cfg.model.lora is None:
            raise ConfigError("kto.reference: 'adapter_disabled' needs LoRA (set model.lora) — use 'copy' or 'precomputed'")
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model)
        self.train_module = CausalLMLogps(self.model, cfg.logprob_chunk_size)
        if cfg.reference == "copy":
            self.reference = CausalLMLogps(load_reference(cfg.model, cfg.reference_model), cfg.logprob_chunk_size)

    def _load(self, path: str, split: str, layout: dict) -> ExampleSet:
        rows = read_rows(path, UNPAIRED_COLUMNS)
        self._rows[split] = rows
        examples, stats = tokenize_unpaired(self.tokenizer, rows, self.truncation(), seed=self.config.seed,
                                            source=str(path))
        self.note_data(split, stats, len(examples))
        return ExampleSet(examples, partial(collate_unpaired, kl=self.config.kl_estimate, **layout), stats)

    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        cfg = self.config
        if not cfg.train_path:
            raise ConfigError("kto.train_path: unpaired training rows are required")
        layout = self._layout = self.token_layout(self.model)
        train = self._load(cfg.train_path, "train", layout)
        n_d, n_u = train.stats["desirable"], train.stats["undesirable"]
        if n_d and n_u:
            ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
            if not 1.0 <= ratio <= 4 / 3:
                log.warning("kto: %d desirable vs %d undesirable responses give lambda_D*n_D/(lambda_U*n_U) = %.2f; "
                            "the paper advises [1, 4/3] (set kto.desirable_weight or kto.undesirable_weight)",
                            n_d, n_u, ratio)
        evals = self._load(cfg.eval_path, "eval", layout) if cfg.eval_path else None
        return train, evals

    def on_prepared(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)
        if self.config.reference == "precomputed":
            for split, data in (("train", self.train_set), ("eval", self.eval_set)):
                if data is not None:
                    self._precompute(split, data)

    # ------------------------------------------------------------------ reference
    def _precompute(self, split: str, data: ExampleSet) -> None:
        """Fill ``ref_logps``/``ref_kl_logps`` of every example from the cache or one no-grad pass."""
        cfg = self.config
        folder = ref_cache_folder(cfg.ref_cache_dir, self.output_dir)
        as_pairs = [{"index": e["index"], "prompt": e["prompt"], "chosen": e["completion"],
                     "rejected": e["kl_completion"]} for e in data.examples]
        key = cache_key(model_fingerprint(cfg.reference_model or cfg.model, memo_dir=folder) + cfg.precision,
                        rows_digest(self._rows[split], ("prompt", "is_chat", "completion")),
                        "kto" + tokenization_digest(as_pairs))
        found, hit = cached_or_computed(self.accelerator, folder, key, [e["index"] for e in data.examples],
                                        lambda: self._compute_reference(data))
        if hit:
            self.reference_cache_hits.append(split)
        for ex, a, b in zip(data.examples, found[0].tolist(), found[1].tolist(), strict=True):
            ex["ref_logps"], ex["ref_kl_logps"] = a, b

    def _compute_reference(self, data: ExampleSet) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        module = None
        if cfg.reference_model is not None:
            module = CausalLMLogps(load_reference(cfg.model, cfg.reference_model),
                                   cfg.logprob_chunk_size).to(self.device)
        matched, kl, forwards = compute_reference_logps(
            lambda batch: self._reference_logps(batch, module, both=True), data.examples,
            partial(collate_unpaired, kl=True, **self._layout), self.device, cfg.batch_size)
        self.reference_forwards += forwards
        return matched, kl

    def _reference_logps(self, batch: dict, module: CausalLMLogps | None = None, both: bool = False) -> torch.Tensor:
        """Reference log-probs of the batch's sequences ``[B]``, with ``both`` followed by those of
        its mismatched sequences ``[2B]`` (no grad, no dropout; the policy with its adapter off
        when ``module`` is None)."""
        parts = [batch, mismatched(batch)] if both else [batch]
        return reference_logps(self.accelerator, self.train_module, self.model, parts, module)

    def _batch_reference(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(reference log-probs [B], of the mismatched sequences [B] or None without ``kl_estimate``)."""
        if "ref_logps" in batch:
            return batch["ref_logps"], batch["ref_kl_logps"] if self.config.kl_estimate else None
        both = self.config.kl_estimate
        seq = self._reference_logps(batch, self.reference, both=both)
        self.reference_forwards += 1
        n = batch["label"].shape[0]
        return seq[:n], (seq[n:] if both else None)

    def _kl_logps(self, batch: dict, ref_kl: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Policy and reference log-probs of the mismatched pairs as :func:`kto_loss` takes them:
        this batch's, or under several processes their mean over all of them (one element each)."""
        if ref_kl is None:
            return None, None
        with torch.no_grad():
            policy_kl = self.train_module(mismatched(batch))["seq_logps"]
        acc = self.accelerator
        if acc.num_processes == 1:
            return policy_kl, ref_kl
        total = acc.reduce(torch.stack([(policy_kl - ref_kl).sum(), torch.tensor(float(len(ref_kl)),
                                                                                    device=ref_kl.device)]), "sum")
        return (total[0] / total[1]).reshape(1), torch.zeros(1, device=ref_kl.device)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict) -> StepOutput:
        cfg = self.config
        out = self.train_module(batch)
        logps = out["seq_logps"]
        ref, ref_kl = self._batch_reference(batch)
        policy_kl, ref_kl = self._kl_logps(batch, ref_kl)
        labels = batch["label"]
        losses, rewards, kl = kto_loss(logps, ref, labels, policy_kl, ref_kl, beta=cfg.beta,
                                       desirable_weight=cfg.desirable_weight,
                                       undesirable_weight=cfg.undesirable_weight)
        if cfg.use_weights:
            loss = (losses * batch["weight"]).sum() / batch["weight"].sum().clamp_min(1e-8)
        else:
            loss = losses.mean()
        up, down = labels.float(), (~labels).float()
        n_up, n_down = up.sum().clamp_min(1), down.sum().clamp_min(1)
        chosen, rejected = (rewards * up).sum() / n_up, (rewards * down).sum() / n_down
        detached = logps.detach()
        metrics = {
            "kl": kl,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margin": chosen - rejected,
            "rewards/accuracy": ((rewards > cfg.beta * kl) == labels).float().mean(),
            "logps/chosen": (detached * up).sum() / n_up,
            "logps/rejected": (detached * down).sum() / n_down,
            "desirable_share": up.mean(),
        }
        if policy_kl is not None:  # z0 before its clamp at 0: a long run of negative estimates is a noisy z0
            metrics["kl/estimate"] = (policy_kl - ref_kl).mean()
        return StepOutput(loss=loss, metrics=metrics, tokens=batch["num_tokens"] + batch.get("kl.num_tokens", 0),
                          samples=labels.shape[0])
