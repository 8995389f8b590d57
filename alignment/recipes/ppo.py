"""PPO with a learned value function (Ziegler et al. 2019; Ouyang et al. 2022) on prompts.

Each step (see :mod:`alignment.recipes.rl_base` for the shared conventions):

1. sample one response per prompt; score it (``reward/raw``), minus ``missing_eos_penalty``
   for responses cut before EOS; normalise (``reward_norm``);
2. no-grad forwards: the rollout policy's log-probs, values and entropy, the reference's log-probs;
3. per-token rewards r_t = -kl_coef * KL_t plus the score at the last response token
   (:func:`alignment.rl.kl_shaped_rewards`, estimator ``kl.estimator``), optionally whitened
   (scale only); GAE (``gamma``, ``lam``) gives advantages (whitened over the batch) and returns.
   With ``kl_penalty: loss`` the rewards carry the score only and the loss gets
   kl_coef * k3(pi, pi_ref) per token instead (as GRPO; its gradient is that of the
   mass-covering KL(pi_ref || pi), which keeps the reference's alternatives alive).
   With ``dense_reward`` (a ``sum``-pooled reward model) the score is paid token by token
   instead: each response token's own score from the reward model, minus a mean token score
   (``token_baseline``), in units of the sequence scores' std (:func:`alignment.rl.token_rewards`);
4. ``update_epochs`` passes of minibatches (:meth:`~alignment.recipes.rl_base.RLRecipe.update`):
   loss = clipped policy loss + ``vf_coef`` * clipped value loss - ``entropy_coef`` * entropy,
   token means over the minibatch;
5. the KL controller (adaptive or fixed) sees the batch's mean sequence KL.

Value warm-up (``value_warmup_steps``): the first steps fit only the value function (loss =
the value loss, the value head's input detached, no entropy bonus), so the policy is still the
initial model when its first advantages are computed from a fitted critic instead of a random head.
The ``head`` starts at zero (V = 0 everywhere, a constant baseline: explained variance 0 at the
start, where a randomly initialised head adds noise and starts below 0).

Value function (``value_model``): ``head`` — a linear head on the policy's last hidden state
(shares the trunk, or only reads it with ``value_head_detached``; saved in checkpoints as
``value.safetensors``); ``separate`` — a sequence-classification model initialised from
``reward_model`` (or the policy's weights with a fresh head when rewards come from
``reward_fn``), which must share the policy's tokenizer: the critic of TRL's PPOTrainer and of
the TL;DR reproduction (Huang et al. 2024), whose value loss never reaches the policy. With a
``last``-pooled reward model its score at a prefix is already a value estimate;
``value_head_init: zero`` keeps only the reward model's trunk (a fresh head at V = 0: the start for
``dense_reward`` from a ``sum``-pooled model). ``value_lr`` gives the critic its own learning rate.

Metrics: ``reward/raw``, ``reward/raw_std``, ``reward/normalized`` / ``reward/norm_mean`` /
``reward/norm_std`` (with ``reward_norm``), ``reward/shaped`` (sum of shaped rewards per sequence), ``kl`` (mean
sequence KL of the rollout policy to the reference), ``kl_coef``, ``entropy`` (per token),
``loss``, ``loss/policy``, ``loss/value``, ``clipfrac``, ``approx_kl`` (rollout → updated
policy), ``vf_clipfrac``, ``explained_variance`` (all response tokens), ``explained_variance_last`` (the
last token, where the score is paid), ``value/mean``, ``response_length``,
``eos_rate``, ``distinct_2`` (pooled over the rollout's responses), ``grad_norm`` (mean over the step's optimizer steps), ``value_warmup`` (1 on a warm-up step), ``generate_tokens_per_s``,
``rollout_s``, ``update_s``; with ``token_baseline`` ``reward/token_baseline`` (the mean token score
subtracted), with ``dense_reward`` ``reward/dense_gap`` (mean |sum of the rollout's token scores - the
sequence score|: 0 unless re-encoding the text changes its tokens); the base adds ``lr``, ``tokens_per_s`` (prompt + response tokens of
the rollout per second of the whole step) and ``samples_per_s``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from alignment.config import ConfigError, ModelSettings, PPOConfig
from alignment.losses import ppo_policy_loss, ppo_value_loss
from alignment.models import hf_model, load_reward_model, load_tokenizer
from alignment.recipes.rl_base import RLRecipe, UpdatePlan
from alignment.recipes.rollout import PolicyModule, Rollout, disable_dropout, token_scores
from alignment.rl import (
    explained_variance,
    gae,
    kl_k3,
    kl_shaped_rewards,
    last_token_explained_variance,
    last_valid_index,
    masked_mean,
    masked_whiten,
    scored_token_mask,
    token_rewards,
)

log = logging.getLogger(__name__)


class PPORecipe(RLRecipe):
    """PPO of ``config.model`` on the prompts of ``config.train_path``."""

    name = "ppo"
    config_class = PPOConfig
    samples_per_prompt = 1

    def build_models(self) -> None:
        cfg: PPOConfig = self.config
        self.build_policy()
        if cfg.dense_reward:
            pooling = getattr(hf_model(self.reward_model).config, "reward_pooling", None) if self.reward_model else None
            if pooling != "sum":
                raise ConfigError("ppo.dense_reward: needs a reward_model trained with pooling 'sum' (its per-token "
                                  f"scores add up to its score); got {pooling or cfg.reward_fn!r}")
        head = model = None
        if cfg.value_model == "head":
            hidden = hf_model(self.model).config.hidden_size
            head = nn.Linear(hidden, 1)
            nn.init.zeros_(head.weight)  # V = 0 everywhere: a constant baseline, never worse than one
            nn.init.zeros_(head.bias)
            self.value_module = head
        else:
            source = cfg.reward_model or cfg.model.name_or_path
            settings = ModelSettings(name_or_path=source, dtype=cfg.model.dtype,
                                     trust_remote_code=cfg.model.trust_remote_code,
                                     gradient_checkpointing=cfg.model.gradient_checkpointing)
            if load_tokenizer(settings).get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError("ppo.value_model: 'separate' needs a reward model that shares the policy's tokenizer")
            model = load_reward_model(settings, self.tokenizer, trainable=True)
            if not hasattr(hf_model(model), "score"):
                raise ConfigError("ppo.value_model: 'separate' needs a decoder backbone with a 'score' head")
            pooling = getattr(hf_model(model).config, "reward_pooling", None) or "last"
            if cfg.value_head_init == "zero":  # a fresh head on the reward model's trunk: V = 0 to start
                nn.init.zeros_(hf_model(model).score.weight)
                if hf_model(model).score.bias is not None:
                    nn.init.zeros_(hf_model(model).score.bias)
            elif pooling != "last":  # its score at a prefix is then not a value of that prefix
                log.warning("ppo.value_model: separate starts the critic from %s, a %s-pooled reward model: its "
                            "score at a prefix is no value estimate of it (a last-pooled one's is), so the "
                            "critic starts poorly; on the demo PPO then fell short of the DPO frontier "
                            "(benchmarks/RESULTS.md, issue 15 point 5)", source, pooling)
            disable_dropout(model)
            self.value_module = model
        self.extra_modules["value.safetensors"] = self.value_module
        self.train_module = PolicyModule(self.model, cfg.logprob_chunk_size, self.temperature,
                                         value_head=head, value_model=model)

    def own_lrs(self) -> dict[int, float]:
        """``value_lr`` for every parameter of the value function (head or separate model)."""
        lr = self.config.value_lr
        return {} if lr is None else {id(p): lr for p in self.value_module.parameters()}

    @torch.no_grad()
    def _rollout_forward(self, roll: Rollout) -> dict[str, torch.Tensor]:
        """Grids ``[B, R]`` of the rollout policy's log-probs, values and entropy, and the reference's log-probs."""
        flat: dict[str, list[torch.Tensor]] = {"logps": [], "values": [], "entropy": [], "ref": []}
        if self.config.dense_reward:
            flat["token_scores"] = []
        for rows in self.micro_batches(range(len(roll))):
            batch = roll.collate(rows, self.layout, self.device)
            with self.accelerator.autocast():
                out = self.train_module(batch, with_entropy=True)
                if self.config.dense_reward:
                    flat["token_scores"].append(token_scores(self.reward_model, batch).float())
            flat["logps"].append(out["token_logps"].float())
            flat["values"].append(out["values"].float())
            flat["entropy"].append(out["entropy"].float())
            flat["ref"].append(self.reference_logps(roll, rows).float())
        return {k: roll.to_grid(torch.cat(v)) for k, v in flat.items()}

    def _dense_scores(self, roll: Rollout, grid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``dense_reward``: the ``[B, R]`` per-token training scores from the reward model's per-token
        scores ``grid`` (:func:`alignment.rl.token_rewards`: minus the ``token_baseline`` mean per-token
        score, in units of the sequence scores' std), plus at each row's last token the
        missing-EOS penalty (and, without a token baseline, minus the sequence scores' mean), so that
        a row sums to its normalised score minus baseline * length. Metrics: ``reward/token_baseline``,
        ``reward/dense_gap`` (mean |sum of token scores - the sequence score|: tokenization drift
        between the rollout's tokens and the scorer's; ~0 when they agree)."""
        cfg: PPOConfig = self.config
        scored = scored_token_mask(roll.mask, roll.hit_eos)
        picked = grid[scored.bool()]
        if self.accelerator.num_processes > 1:  # every process's tokens count toward the baseline
            padded = self.accelerator.pad_across_processes(picked, pad_index=float("nan"))
            picked = self.accelerator.gather(padded)
            picked = picked[~torch.isnan(picked)]
        norm_mean, norm_std = self.norm_moments
        scale = norm_std if norm_std > 0 else 1.0
        baseline = float(picked.mean()) if cfg.token_baseline == "batch_mean" and picked.numel() else 0.0
        dense = token_rewards(grid, scored, baseline, scale)
        at_end = torch.zeros(len(roll), device=grid.device)
        if cfg.missing_eos_penalty is not None:
            at_end -= cfg.missing_eos_penalty * (~roll.hit_eos).float() / scale
        if cfg.token_baseline == "none":
            at_end -= norm_mean / scale
        rows = torch.arange(len(roll), device=grid.device)
        dense[rows, last_valid_index(roll.mask)] += at_end
        sums = (grid * scored).sum(1)
        return dense * roll.mask, {"reward/token_baseline": baseline,
                                   "reward/dense_gap": float((sums - roll.raw_scores).abs().mean())}

    def plan_update(self, roll: Rollout) -> UpdatePlan:
        """KL-shaped rewards, GAE advantages and returns; the clipped policy + value loss."""
        cfg: PPOConfig = self.config
        old = self._rollout_forward(roll)
        mask = roll.mask
        kl_coef = self.kl_ctl.value
        in_loss = cfg.kl_penalty == "loss"
        scores, dense_metrics = (self._dense_scores(roll, old["token_scores"]) if cfg.dense_reward
                                 else (roll.scores, {}))
        rewards, kl = kl_shaped_rewards(scores, old["logps"], old["ref"], mask, 0.0 if in_loss else kl_coef,
                                        cfg.kl.estimator)
        shaped_return = ((scores.sum(1) if cfg.dense_reward else scores) - kl_coef * kl.sum(1)).mean()
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old["values"], mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
        warmup = self.step < cfg.value_warmup_steps

        def loss(out: dict[str, torch.Tensor], rows: list[int], m: torch.Tensor):
            if warmup:  # the critic alone: the policy's log-probs are not in the loss
                vf, vf_stats = ppo_value_loss(out["values"], old["values"][rows][m], returns[rows][m],
                                              torch.ones_like(out["values"]), cfg.value_clip)
                return vf, {"loss/value": vf, **vf_stats}
            pg, pg_stats = ppo_policy_loss(out["token_logps"], old["logps"][rows][m], advantages[rows][m],
                                           torch.ones_like(out["token_logps"]), cfg.clip_range)
            vf, vf_stats = ppo_value_loss(out["values"], old["values"][rows][m], returns[rows][m],
                                          torch.ones_like(out["values"]), cfg.value_clip)
            stats = {"loss/policy": pg, "loss/value": vf, **pg_stats, **vf_stats}
            if in_loss:
                kl_term = kl_k3(out["token_logps"], old["ref"][rows][m]).mean()
                return pg + cfg.vf_coef * vf + kl_coef * kl_term, {**stats, "loss/kl": kl_term}
            return pg + cfg.vf_coef * vf, stats

        def finish() -> tuple[float, dict[str, Any]]:
            seq_kl = float(kl.sum(1).mean())
            return seq_kl, {
                "reward/shaped": float(shaped_return),
                "kl": seq_kl,
                "kl_coef": kl_coef,
                "entropy": float(masked_mean(old["entropy"], mask)),
                "explained_variance": explained_variance(old["values"], returns, mask),
                "explained_variance_last": last_token_explained_variance(old["values"], returns, mask),
                "value/mean": float(masked_mean(old["values"], mask)),
                "value_warmup": float(warmup),
                **dense_metrics,
            }

        return UpdatePlan(loss, finish, with_entropy=self.entropy_ctl.value > 0 and not warmup, entropy_grad=True,
                          policy_trains=not warmup,
                          forward_kwargs={"detach_value_input": warmup or cfg.value_head_detached})
