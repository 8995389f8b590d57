"""Direct preference optimisation and its relatives on ``prompt, is_chat, chosen, rejected`` pairs.

Loss types (math in :func:`alignment.losses.dpo_loss` / :func:`alignment.losses.simpo_loss`):
``sigmoid`` (DPO; with ``label_smoothing`` conservative DPO), ``ipo``, ``hinge`` and ``simpo``
(reference-free, length-normalised log-probs, margin ``simpo_gamma``). Per-pair losses are
averaged with the pairs' ``weight`` column when ``use_weights``.

Chosen and rejected responses (EOS appended) go through the policy in one forward. The
reference is, by ``reference``:

* ``precomputed`` (default) — one no-grad pass before training with the *initial* policy (or
  ``reference_model``), cached on disk by :mod:`alignment.refcache` (``ref_cache_dir``, default
  ``<output_dir>/ref_cache``) and reused by later runs: training then does no reference forward;
* ``adapter_disabled`` — the LoRA policy with its adapter switched off (needs ``model.lora``);
* ``copy`` — a frozen second model in memory.

One training step is :meth:`~alignment.recipes.supervised.SupervisedRecipe.train_step` (micro-batches,
backward, one guarded update) around :meth:`DPORecipe.compute_loss`, which reads top to bottom:
policy log-probs, reference log-probs, per-pair losses, weighted mean, metrics.

Metrics: ``rewards/chosen``, ``rewards/rejected`` (beta * (log pi - log pi_ref), SimPO:
beta * mean log pi), ``rewards/margin``, ``rewards/accuracy`` (share of pairs whose chosen reward
is higher), ``logps/chosen``, ``logps/rejected`` (summed policy log-probs); with ``nll_coef``
``nll/chosen``; with ``entropy_coef`` ``entropy/chosen``, ``entropy/rejected`` (the policy's mean
next-token entropy over each response, :func:`alignment.losses.entropy_bonus`; with
``entropy_excludes_eos`` the entropy over the non-EOS mass); with ``entropy_target`` also
``entropy_coef``, the weight the step used (it moves after each step to hold the entropy at the
target; a checkpoint keeps it and the target, so a resumed run goes on with both).
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import torch

from alignment.batching import ExampleSet, collate_pairs, pair_halves, read_rows, tokenize_pairs
from alignment.budget import DriftProbe, ProbeReading, budget_breach
from alignment.config import ConfigError, DPOConfig
from alignment.losses import chosen_nll, dpo_loss, entropy_bonus, simpo_loss
from alignment.models import (
    CausalLMLogps,
    load_causal_lm,
    load_reference,
    load_tokenizer,
    model_fingerprint,
)
from alignment.recipes.reference import cached_or_computed, ref_cache_folder, reference_logps
from alignment.recipes.state import load_trainable_state
from alignment.recipes.supervised import PendingStep, StepOutput, SupervisedRecipe
from alignment.refcache import (
    attach,
    cache_key,
    compute_reference_logps,
    rows_digest,
    tokenization_digest,
)
from alignment.rl import AdaptiveEntropyController

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class DPORecipe(SupervisedRecipe):
    """DPO-family training of ``config.model`` on ``config.train_path``."""

    name = "dpo"
    config_class = DPOConfig
    released_on_cleanup = (*SupervisedRecipe.released_on_cleanup, "reference")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference: CausalLMLogps | None = None
        self.reference_forwards = 0
        """Reference forward passes this run did (0 when every log-prob came from the cache)."""
        self.reference_cache_hits: list[str] = []
        self._rows: dict[str, list[dict]] = {}
        self.probe: DriftProbe | None = None
        self.readings: list[ProbeReading] = []
        """Drift-budget probes taken so far (``config.budget``)."""
        self.budget_stop: dict[str, Any] | None = None
        """Why and where a drift budget ended training, and which step's weights were kept."""
        self._within_budget: tuple[int, dict[str, torch.Tensor]] | None = None
        cfg = self.config
        self.entropy_ctl = AdaptiveEntropyController(cfg.entropy_coef, cfg.entropy_target, cfg.entropy_coef_step,
                                                     cfg.entropy_coef_max)
        """The entropy term's weight: ``entropy_coef`` throughout, or held to ``entropy_target``."""
        if cfg.entropy_target is not None:
            self.stateful["entropy_ctl"] = self.entropy_ctl

    @property
    def uses_entropy(self) -> bool:
        """Whether the loss has the entropy term (a weight, or a target that may raise one from 0)."""
        return self.config.entropy_coef > 0 or self.config.entropy_target is not None

    @property
    def needs_reference(self) -> bool:
        return self.config.loss_type != "simpo"

    def build_models(self) -> None:
        cfg = self.config
        if cfg.model is None:
            raise ConfigError("dpo.model: a policy model is required")
        if self.needs_reference and cfg.reference == "adapter_disabled" and cfg.model.lora is None:
            raise ConfigError("dpo.reference: 'adapter_disabled' needs LoRA (set model.lora) — use 'copy' or 'precomputed'")
        if cfg.entropy_target is not None and cfg.entropy_coef > cfg.entropy_coef_max:
            raise ConfigError(f"dpo.entropy_coef ({cfg.entropy_coef}), the starting weight under entropy_target, is "
                              f"above entropy_coef_max ({cfg.entropy_coef_max})")
        if cfg.label_smoothing and cfg.loss_type in ("ipo", "hinge"):
            raise ConfigError(f"dpo.label_smoothing: only defined for loss_type sigmoid or simpo, not {cfg.loss_type!r}")
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model)
        self.train_module = CausalLMLogps(self.model, cfg.logprob_chunk_size)
        self.train_module.with_entropy = self.uses_entropy
        if self.uses_entropy and cfg.entropy_excludes_eos:
            if self.tokenizer.eos_token_id is None:
                raise ConfigError("dpo.entropy_excludes_eos: the tokenizer has no EOS token")
            self.train_module.entropy_exclude = self.tokenizer.eos_token_id
        if self.needs_reference and cfg.reference == "copy":
            self.reference = CausalLMLogps(load_reference(cfg.model, cfg.reference_model), cfg.logprob_chunk_size)

    def _load(self, path: str, split: str, layout: dict) -> ExampleSet:
        rows = read_rows(path, PAIR_COLUMNS)
        self._rows[split] = rows
        examples, stats = tokenize_pairs(self.tokenizer, rows, self.truncation(), source=str(path))
        self.note_data(split, stats, len(examples))
        return ExampleSet(examples, partial(collate_pairs, **layout), stats)

    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        if not self.config.train_path:
            raise ConfigError("dpo.train_path: training pairs are required")
        layout = self.token_layout(self.model, can_share=True)
        train = self._load(self.config.train_path, "train", layout)
        evals = self._load(self.config.eval_path, "eval", layout) if self.config.eval_path else None
        return train, evals

    def on_prepared(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)
        if self.needs_reference and self.config.reference == "precomputed":
            for split, data in (("train", self.train_set), ("eval", self.eval_set)):
                if data is not None:
                    self._precompute(split, data)
        if self.config.budget is not None:
            self._start_probe()

    # ------------------------------------------------------------------ drift budget
    def _start_probe(self) -> None:
        """The probe against ``budget.reference``, else the DPO reference (``reference_model``, else
        the initial policy, read from its folder so a resumed run still measures from the start),
        on training prompts."""
        cfg, budget = self.config, self.config.budget
        prompts = list({str(r["prompt"]): r["prompt"] for r in self._rows["train"]}.values())
        random.Random(cfg.seed).shuffle(prompts)
        reference = load_reference(cfg.model, budget.reference or cfg.reference_model).to(self.device)
        self.probe = DriftProbe(reference, self.tokenizer, prompts[: budget.prompts], budget.generation, cfg.seed,
                                max_prompt_length=cfg.max_prompt_length)
        self._within_budget = (self.step, self._weights())

    def _weights(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable parameters (frozen weights, e.g. a LoRA base, never change)."""
        policy = self.accelerator.unwrap_model(self.model)
        return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    def stop_early(self) -> bool:
        """Every ``budget.every`` steps: probe the policy; within budget, remember these weights;
        past it, put back the last weights within budget and end training."""
        budget = self.config.budget
        if self.probe is None or self.step % budget.every:
            return False
        reading = self.probe.read(self.accelerator.unwrap_model(self.model), self.step)
        self.readings.append(reading)
        self.emit({"budget/kl": reading.kl, "budget/distinct2": reading.distinct2,
                   "budget/distinct2_ratio": reading.distinct2_ratio}, "train")
        reason = budget_breach(reading, budget.max_kl, budget.min_distinct2_ratio)
        if reason is None:
            self._within_budget = (self.step, self._weights())
            return False
        kept, weights = self._within_budget
        load_trainable_state(self.accelerator.unwrap_model(self.model), weights, f"step {kept}'s weights")
        self.budget_stop = {"reason": reason, "stopped_at": self.step, "kept_step": kept}
        print(f"dpo: drift budget: {reason}; keeping the weights of step {kept}", flush=True)
        return True

    def summary(self, finished: bool) -> dict[str, Any]:
        out = super().summary(finished)
        if self.config.budget is not None:
            out["budget"] = {"stop": self.budget_stop,
                             "readings": [{"step": r.step, "kl": r.kl, "distinct2": r.distinct2,
                                           "distinct2_ratio": r.distinct2_ratio} for r in self.readings]}
        return out

    # ------------------------------------------------------------------ reference
    def _precompute(self, split: str, data: ExampleSet) -> None:
        """Fill ``ref_chosen``/``ref_rejected`` of every example from the cache or one no-grad pass."""
        cfg = self.config
        folder = ref_cache_folder(cfg.ref_cache_dir, self.output_dir)
        key = cache_key(
            model_fingerprint(cfg.reference_model or cfg.model, memo_dir=folder) + cfg.precision,
            rows_digest(self._rows[split]),
            tokenization_digest(data.examples),
        )
        found, hit = cached_or_computed(self.accelerator, folder, key, [e["index"] for e in data.examples],
                                        lambda: self._compute_reference(data))
        if hit:
            self.reference_cache_hits.append(split)
        attach(data.examples, *found)

    def _compute_reference(self, data: ExampleSet) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        if cfg.reference_model is not None:
            module = CausalLMLogps(load_reference(cfg.model, cfg.reference_model), cfg.logprob_chunk_size).to(self.device)
        else:
            module = None  # the initial policy, adapter off under LoRA (equal to the base at step 0)
        chosen, rejected, forwards = compute_reference_logps(
            lambda batch: self._reference_logps(batch, module), data.examples, data.collate, self.device,
            cfg.batch_size,
        )
        self.reference_forwards += forwards
        return chosen, rejected

    def _reference_logps(self, batch: dict, module: CausalLMLogps | None = None) -> torch.Tensor:
        """Per-sequence reference log-probs ``[2B]`` (no grad, no dropout)."""
        return reference_logps(self.accelerator, self.train_module, self.model, [batch], module)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict) -> StepOutput:
        """One micro-batch of pairs (:func:`~alignment.batching.pair_halves`): policy log-probs, reference
        log-probs (precomputed in the batch, or a forward of the frozen copy), per-pair losses,
        their (weighted) mean and the reward metrics."""
        cfg = self.config
        out = self.train_module(batch)
        seq_logps = out["seq_logps"]
        chosen, rejected = pair_halves(seq_logps, batch)
        n = chosen.shape[0]
        if cfg.loss_type == "simpo":  # reference-free, on length-normalised log-probs
            avg_c, avg_r = pair_halves(seq_logps / out["seq_tokens"].clamp_min(1), batch)
            losses, r_c, r_r = simpo_loss(avg_c, avg_r, beta=cfg.beta, gamma=cfg.simpo_gamma,
                                          label_smoothing=cfg.label_smoothing)
        else:
            if "ref_chosen" in batch:
                ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
            else:
                ref_c, ref_r = pair_halves(self._reference_logps(batch, self.reference), batch)
                self.reference_forwards += 1
            losses, r_c, r_r = dpo_loss(chosen, rejected, ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                                        label_smoothing=cfg.label_smoothing)
        nll = chosen_nll(chosen, pair_halves(out["seq_tokens"], batch)[0]) if cfg.nll_coef else None
        if nll is not None:
            losses = losses + cfg.nll_coef * nll
        if self.uses_entropy:  # mean of the two responses' terms, per pair
            bonus_c, bonus_r = pair_halves(entropy_bonus(out["seq_entropy"], out["seq_tokens"]), batch)
            losses = losses + self.entropy_ctl.value * 0.5 * (bonus_c + bonus_r)
        if cfg.use_weights and "weight" in batch:
            loss = (losses * batch["weight"]).sum() / batch["weight"].sum().clamp_min(1e-8)
        else:
            loss = losses.mean()
        metrics = {
            "rewards/chosen": r_c.mean(),
            "rewards/rejected": r_r.mean(),
            "rewards/margin": (r_c - r_r).mean(),
            "rewards/accuracy": (r_c > r_r).float().mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        if nll is not None:
            metrics["nll/chosen"] = nll.detach().mean()
        if self.uses_entropy:
            metrics["entropy/chosen"] = -bonus_c.detach().mean()
            metrics["entropy/rejected"] = -bonus_r.detach().mean()
        return StepOutput(loss=loss, metrics=metrics, tokens=batch["num_tokens"], samples=n)

    def train_step(self) -> dict[str, float] | PendingStep:
        """One step (:meth:`SupervisedRecipe.train_step`); under ``entropy_target`` the step's metrics
        are read at once (no overlap with the next step) because the entropy weight of the next step
        follows from this one's entropy, and they carry ``entropy_coef``, the weight this step used."""
        out = super().train_step()
        if self.config.entropy_target is None:
            return out
        metrics = out.resolve() if isinstance(out, PendingStep) else out
        metrics["entropy_coef"] = self.entropy_ctl.value
        self.entropy_ctl.update(0.5 * (metrics["entropy/chosen"] + metrics["entropy/rejected"]))
        return metrics
