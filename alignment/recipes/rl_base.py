"""RL recipes (PPO, GRPO): one step is a rollout, then minibatch updates on its samples.

One training **step** (:meth:`RLRecipe.train_step`, written once for both algorithms):

1. sample responses for ``rollout_batch_size`` prompts (per process) with
   :func:`alignment.generation.generate` and score them (a reward model folder, or a
   ``reward_fn`` ``"module:function"`` mapping ``(prompts, responses) -> list[float]``), minus
   ``missing_eos_penalty`` for responses cut before EOS, made length-neutral (``token_baseline``:
   minus the rollout's mean score per token times the response's length), then normalised
   (``reward_norm``: the batch's or the running moments, :func:`alignment.rl.normalize_scores`);
2. the algorithm plans its update (:meth:`RLRecipe.plan_update`: no-grad log-probs,
   advantages) and returns an :class:`UpdatePlan`;
3. :meth:`RLRecipe.update`: ``update_epochs`` passes over the samples in minibatches of
   ``minibatch_size`` samples, one optimizer step each, forwarded ``batch_size`` samples at a
   time (so ``grad_accum`` is not used: set it to 1); each minibatch's loss is the token mean
   of the plan's per-micro-batch loss (minus the entropy coefficient times the entropy);
4. the KL controller moves on the step's (process-mean) sequence KL, the entropy controller
   (``entropy_target``) on its per-token entropy.

The learning-rate schedule counts optimizer steps.

Conventions
-----------
* Per-token tensors and the rollout layout: :mod:`alignment.recipes.rollout`.
* Dropout is switched off in the policy (and value model): PPO ratios must compare the same
  function, and the rollout and update forwards must agree.
* The reference is a frozen copy of the initial policy, or the policy with its LoRA adapter
  disabled (no second copy).
* Resume: rollout sampling and minibatch order are seeded from ``(seed, step, rank)`` and the
  KL coefficient is checkpointed (``extra.json``), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignment.batching import ExampleSet, Prompt, decode_prompt, encode_prompt, read_rows
from alignment.config import ConfigError, ModelSettings, RLSettings
from alignment.generation import generate
from alignment.logprobs import check_finite
from alignment.models import (
    adapter_disabled,
    is_peft,
    load_causal_lm,
    load_reference,
    load_reward_model,
    load_tokenizer,
    score_responses,
)
from alignment.recipes.base import Recipe
from alignment.recipes.rollout import Rollout, disable_dropout, load_reward_fn, response_forward
from alignment.rl import (
    AdaptiveEntropyController,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    kl_k1,
    length_neutral_scores,
    normalize_scores,
    scored_token_mask,
)
from alignment.text_stats import distinct_n

__all__ = ["RLRecipe", "UpdatePlan"]


@dataclass
class UpdatePlan:
    """What an algorithm hands the shared minibatch loop for one rollout.

    ``loss(out, rows, mask)`` → ``(loss, stats)``: the token-mean loss of micro-batch ``rows``
    (``out`` is the policy module's output for them, ``mask`` their ``[b, R]`` response mask as
    bool) without the entropy bonus, and scalar tensors (``stats``) that the loop detaches and
    averages into the step's metrics. ``finish()`` → ``(sequence KL, metrics)`` once the updates are done: the mean KL of
    the rollout policy to the reference (for the KL controller) and the algorithm's metrics.
    ``with_entropy`` / ``entropy_grad`` (and ``forward_kwargs``) are passed to the policy module's
    forward. ``policy_trains`` False (a value warm-up step) leaves out the entropy bonus.
    """

    loss: Callable[[dict[str, torch.Tensor], list[int], torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    finish: Callable[[], tuple[float, dict[str, Any]]]
    with_entropy: bool
    entropy_grad: bool
    policy_trains: bool = True
    forward_kwargs: dict[str, Any] | None = None


class RLRecipe(Recipe):
    """Rollout-and-update recipes; a subclass writes ``build_models()`` (calling
    :meth:`build_policy`), ``samples_per_prompt`` and :meth:`plan_update`."""

    config_class = RLSettings

    @property
    @abstractmethod
    def samples_per_prompt(self) -> int:
        """Responses sampled per prompt in a rollout."""

    @abstractmethod
    def plan_update(self, roll: Rollout) -> UpdatePlan:
        """Everything of the algorithm before the updates: no-grad forwards, advantages, the loss."""

    # ------------------------------------------------------------------ models and data
    def build_policy(self) -> None:
        """Policy, tokenizer, reward source and KL controller; the reference and reward model are
        loaded here and moved to the device in :meth:`on_prepared`."""
        cfg = self.config
        if cfg.model is None:
            raise ConfigError(f"{self.name}.model: a policy model is required")
        if (cfg.reward_model is None) == (cfg.reward_fn is None):
            raise ConfigError(f"{self.name}.reward_model / {self.name}.reward_fn: set exactly one of them")
        if cfg.grad_accum != 1:
            raise ConfigError(f"{self.name}.grad_accum: RL recipes step once per minibatch_size samples; "
                              "set grad_accum to 1 and use minibatch_size / batch_size")
        if cfg.max_prompt_length + cfg.generation.max_new_tokens > cfg.max_length:
            raise ConfigError(
                f"{self.name}.max_length: max_prompt_length ({cfg.max_prompt_length}) + generation.max_new_tokens "
                f"({cfg.generation.max_new_tokens}) exceeds max_length ({cfg.max_length})"
            )
        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_causal_lm(cfg.model)
        disable_dropout(self.model)
        self.reference = None if is_peft(self.model) else load_reference(cfg.model)
        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        self.reward_model = self.reward_tokenizer = None
        if cfg.reward_model:
            rm = ModelSettings(name_or_path=cfg.reward_model, dtype=cfg.model.dtype,
                               trust_remote_code=cfg.model.trust_remote_code)
            self.reward_tokenizer = load_tokenizer(rm)
            self.reward_model = load_reward_model(rm, self.reward_tokenizer, trainable=False)
        kl = cfg.kl
        self.kl_ctl = AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.adaptive else FixedKLController(kl.coef)
        self.stateful["kl_ctl"] = self.kl_ctl  # checkpointed: a resumed run continues its coefficient
        self.entropy_ctl = AdaptiveEntropyController(cfg.entropy_coef, cfg.entropy_target, cfg.entropy_coef_step,
                                                     cfg.entropy_coef_max)
        self.stateful["entropy_ctl"] = self.entropy_ctl
        self.score_moments = RunningMoments()
        if cfg.reward_norm == "running":
            self.stateful["score_moments"] = self.score_moments  # a resumed run normalises the same way

    @property
    def temperature(self) -> float:
        gen = self.config.generation
        return gen.temperature if gen.do_sample else 1.0

    def on_prepared(self) -> None:
        for frozen in (self.reference, self.reward_model):
            if frozen is not None:
                frozen.to(self.device)

    def _load_prompts(self, path: str, split: str) -> ExampleSet:
        rows = read_rows(path, ["prompt"])
        if not rows:
            raise ValueError(f"{path}: no prompts")
        examples, truncated = [], 0
        limit = self.config.max_prompt_length
        for i, row in enumerate(rows):
            try:
                prompt = decode_prompt(row)
            except ValueError as err:
                raise ValueError(f"{path} row {i}: {err}") from None
            n = len(encode_prompt(self.tokenizer, prompt))
            truncated += n > limit
            examples.append({"index": i, "prompt": prompt, "num_tokens": min(n, limit)})
        self.note_data(split, {"truncated": truncated, "dropped": 0}, len(examples))
        return ExampleSet(examples, lambda exs: {"prompts": [e["prompt"] for e in exs]}, {})

    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        cfg = self.config
        if not cfg.train_path:
            raise ConfigError(f"{self.name}.train_path: a prompts table is required")
        self.layout = self.token_layout(self.model)
        train = self._load_prompts(cfg.train_path, "train")
        evals = self._load_prompts(cfg.eval_path, "eval") if cfg.eval_path else None
        return train, evals

    # ------------------------------------------------------------------ step sizing
    def sampler_batch_size(self) -> int:
        return self.config.rollout_batch_size

    def steps_per_epoch(self) -> int:
        return max(1, len(self.feed))

    def optimizer_steps_per_step(self) -> int:
        n = self.config.rollout_batch_size * self.samples_per_prompt
        return self.config.update_epochs * math.ceil(n / self.config.minibatch_size)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """Rollout, the algorithm's plan, its minibatch updates, the KL controller; the step's
        metrics (means over processes; ``tokens`` and ``samples`` summed)."""
        started = time.perf_counter()
        roll = self.sample(self.feed.collate_next()["prompts"], repeats=self.samples_per_prompt)
        baseline_metrics = {}
        # PPO's dense_reward pays token by token and applies token_baseline itself
        if self.config.token_baseline == "batch_mean" and not getattr(self.config, "dense_reward", False):
            roll.scores, baseline = self.length_neutral(roll)
            baseline_metrics["reward/token_baseline"] = baseline
        roll.scores = self.normalized(roll.scores)
        plan = self.plan_update(roll)
        rollout_s = time.perf_counter() - started
        metrics = self.update(roll, plan)
        update_s = time.perf_counter() - started - rollout_s
        seq_kl, algorithm_metrics = plan.finish()
        self.kl_ctl.update(float(self.reduce_metrics({"kl": seq_kl})["kl"]), len(roll) * self.accelerator.num_processes)
        metrics["entropy_coef"] = self.entropy_ctl.value  # the coefficient this step's updates used
        if "entropy" in algorithm_metrics:
            self.entropy_ctl.update(float(self.reduce_metrics({"e": algorithm_metrics["entropy"]})["e"]))
        mask = roll.mask
        metrics["reward/raw"] = float(roll.raw_scores.mean())
        metrics["reward/raw_std"] = float(roll.raw_scores.std()) if len(roll) > 1 else 0.0
        metrics["distinct_2"] = distinct_n(roll.texts, 2)  # pooled over the rollout: falls when phrases get stuffed
        if self.config.reward_norm != "none":
            metrics["reward/normalized"] = float(roll.scores.mean())
            metrics["reward/norm_mean"], metrics["reward/norm_std"] = self.norm_moments
        metrics.update(algorithm_metrics)
        metrics.update(baseline_metrics)
        metrics.update({
            "response_length": float(mask.sum(1).float().mean()),
            "eos_rate": float(roll.hit_eos.float().mean()),
            "generate_tokens_per_s": float(mask.sum()) / max(roll.generate_s, 1e-9),
            "rollout_s": rollout_s,
            "update_s": update_s,
            "tokens": roll.num_tokens,
            "samples": len(roll),
        })
        return self.reduce_metrics(metrics)

    def length_neutral(self, roll: Rollout) -> tuple[torch.Tensor, float]:
        """``token_baseline: batch_mean`` on sequence scores: S - b * L with L each response's scored
        tokens (:func:`alignment.rl.scored_token_mask`) and b the rollout's score per scored token,
        totals over all processes (:func:`alignment.rl.length_neutral_scores`)."""
        lengths = scored_token_mask(roll.mask, roll.hit_eos).sum(1).to(roll.scores.dtype)
        totals = torch.stack([roll.scores.sum(), lengths.sum()]).double()
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        baseline = float(totals[0] / totals[1]) if float(totals[1]) > 0 else 0.0
        return length_neutral_scores(roll.scores, lengths, baseline)

    def normalized(self, scores: torch.Tensor) -> torch.Tensor:
        """The training scores under ``reward_norm`` (all processes' scores count toward the moments).
        The moments applied are kept in ``norm_moments`` (logged as ``reward/norm_mean`` and
        ``reward/norm_std``, and the scale of PPO's dense rewards): with ``batch`` they are the
        gathered batch's, the same on every process."""
        mode = self.config.reward_norm
        if mode == "none":
            self.norm_moments = (0.0, 1.0)
            return scores
        every = self.accelerator.gather(scores) if self.accelerator.num_processes > 1 else scores
        if mode == "batch":
            self.norm_moments = (float(every.mean()), float(every.std()) if every.numel() > 1 else 0.0)
        else:
            self.score_moments.update(every)
            self.norm_moments = (self.score_moments.mean, self.score_moments.std)
        return normalize_scores(scores, *self.norm_moments)

    def update(self, roll: Rollout, plan: UpdatePlan) -> dict[str, float]:
        """``update_epochs`` passes of minibatches over ``roll``, one guarded optimizer step each.

        Each minibatch's loss is the token mean over all its response tokens: a micro-batch's
        loss is weighted by its share of them. Returns the plan's stats averaged over updates,
        then ``loss`` and ``grad_norm`` (means over updates).
        """
        mask = roll.mask
        sums: dict[str, torch.Tensor] = {}
        losses, norms = [], []
        for minibatch in self.minibatches(len(roll)):
            n_tokens = mask[minibatch].sum().clamp_min(1)
            total = torch.zeros((), device=self.device)
            for rows in self.micro_batches(minibatch):
                batch = roll.collate(rows, self.layout, self.device)
                m = mask[rows].bool()
                with self.accelerator.autocast():
                    out = self.train_module(batch, with_entropy=plan.with_entropy, entropy_grad=plan.entropy_grad,
                                            **(plan.forward_kwargs or {}))
                loss, stats = plan.loss(out, rows, m)
                if self.entropy_ctl.value > 0 and plan.policy_trains:
                    loss = loss - self.entropy_ctl.value * out["entropy"].mean()
                share = m.sum() / n_tokens
                self.accelerator.backward(loss * share)
                total += (loss * share).detach()
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float() * share
            losses.append(total)
            norms.append(self.optimizer_step(total))
        metrics: dict[str, Any] = {k: float(v) / len(norms) for k, v in sums.items()}
        metrics["loss"] = float(torch.stack(losses).mean())
        metrics["grad_norm"] = float(torch.stack(norms).float().mean())
        return metrics

    # ------------------------------------------------------------------ rollouts
    def _seed(self, salt: int) -> int:
        return (self.config.seed * 1_000_003 + self.step * 7_919 + self.accelerator.process_index * 104_729 + salt) % 2**62

    def score(self, prompts: list[Prompt], texts: list[str]) -> torch.Tensor:
        """Rewards ``[B]`` (fp32, on the device). Raises ValueError or NonFiniteError on bad rewards."""
        if self.reward_fn is not None:
            values = list(self.reward_fn(prompts, texts))
        else:
            cfg = self.config
            with self.accelerator.autocast():
                values = score_responses(self.reward_model, self.reward_tokenizer, prompts, texts, cfg.batch_size,
                                         max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        if len(values) != len(texts):
            raise ValueError(f"the reward returned {len(values)} scores for {len(texts)} responses")
        scores = torch.tensor([float(v) for v in values], dtype=torch.float32, device=self.device)
        check_finite("reward/raw", scores, self.step + 1)
        return scores

    @torch.no_grad()
    def sample(self, prompts: list[Prompt], repeats: int = 1, seed: int | None = None) -> Rollout:
        """Generate ``repeats`` responses per prompt (contiguous groups) and score them."""
        cfg = self.config
        expanded = [p for p in prompts for _ in range(repeats)]
        started = time.perf_counter()
        with self.accelerator.autocast():
            res = generate(self.model, self.tokenizer, expanded, cfg.generation,
                           self._seed(0) if seed is None else seed, max_prompt_length=cfg.max_prompt_length)
        took = time.perf_counter() - started
        raw = self.score(expanded, res.texts)
        hit_eos = res.hit_eos.to(self.device)
        scores = raw
        if cfg.missing_eos_penalty is not None:
            scores = raw - cfg.missing_eos_penalty * (~hit_eos).float()
        return Rollout(
            prompts=expanded,
            prompt_tokens=[r[m.bool()].tolist() for r, m in zip(res.prompt_ids, res.prompt_mask, strict=True)],
            response_tokens=[r[m.bool()].tolist() for r, m in zip(res.response_ids, res.response_mask, strict=True)],
            texts=res.texts, hit_eos=hit_eos, raw_scores=raw, scores=scores,
            mask=res.response_mask.to(self.device), generate_s=took,
        )

    @torch.no_grad()
    def reference_logps(self, roll: Rollout, rows: Sequence[int]) -> torch.Tensor:
        """Flat reference log-probs of ``rows`` (frozen copy, or the policy with its adapter off)."""
        batch = roll.collate(rows, self.layout, self.device)
        with self.accelerator.autocast():
            if self.reference is not None:
                return response_forward(self.reference, batch, self.config.logprob_chunk_size, self.temperature)[
                    "token_logps"]
            with adapter_disabled(self.model):
                return response_forward(self.model, batch, self.config.logprob_chunk_size, self.temperature)[
                    "token_logps"]

    def micro_batches(self, rows: Sequence[int]) -> list[list[int]]:
        bs = self.config.batch_size
        return [list(rows[i : i + bs]) for i in range(0, len(rows), bs)]

    def minibatches(self, n: int) -> list[list[int]]:
        """``update_epochs`` seeded permutations of ``range(n)`` cut into minibatches."""
        gen = torch.Generator().manual_seed(self._seed(1))
        mb = self.config.minibatch_size
        out = []
        for _ in range(self.config.update_epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            out.extend(perm[i : i + mb] for i in range(0, n, mb))
        return out

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over processes (tokens and samples: sum)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        vec = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        summed = acc.reduce(vec, reduction="sum").tolist()
        n = acc.num_processes
        return {k: v if k in ("tokens", "samples") else v / n for k, v in zip(keys, summed, strict=True)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        """Sample once per held-out prompt (fixed seed) → ``eval/reward/raw``, ``eval/kl`` (k1,
        per sequence), ``eval/response_length``, ``eval/eos_rate``."""
        if self.eval_set is None or len(self.eval_set) == 0:
            return {}
        acc = self.accelerator
        prompts = [e["prompt"] for e in self.eval_set.examples][acc.process_index :: acc.num_processes]
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        if prompts:
            roll = self.sample(prompts, seed=self.config.seed + 1 + acc.process_index)
            kl = []
            for rows in self.micro_batches(range(len(roll))):
                batch = roll.collate(rows, self.layout, self.device)
                with acc.autocast():
                    lp = response_forward(self.model, batch, self.config.logprob_chunk_size, self.temperature)
                ref = self.reference_logps(roll, rows)
                kl.append(roll.to_grid(kl_k1(lp["token_logps"], ref), rows).sum(1))
            n = len(roll)
            sums += torch.tensor([roll.raw_scores.sum().item(), torch.cat(kl).sum().item(),
                                  roll.mask.sum().item(), roll.hit_eos.float().sum().item(), n],
                                 dtype=torch.float64, device=self.device)
        if acc.num_processes > 1:
            sums = acc.reduce(sums, reduction="sum")
        total = max(sums[4].item(), 1.0)
        return {"eval/reward/raw": sums[0].item() / total, "eval/kl": sums[1].item() / total,
                "eval/response_length": sums[2].item() / total, "eval/eos_rate": sums[3].item() / total}
