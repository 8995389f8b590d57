"""GRPO / RLOO: critic-free policy optimisation with several samples per prompt.

Each step (shared conventions in :mod:`alignment.recipes.rl_base`):

1. sample ``group_size`` responses for each of ``rollout_batch_size`` prompts and score them
   (normalised by ``reward_norm``);
2. sequence advantages within each group (:func:`alignment.rl.group_advantages`): ``grpo``
   (r - mean) / std (``scale_by_std: false`` = Dr. GRPO), or ``rloo`` (leave-one-out baseline);
   every token of a response gets its sequence's advantage; with ``process_reward`` (a sum-pooled
   reward model) each token gets instead the sum of the model's per-token scores from it to the end,
   centred on its group's mean score per token (:func:`alignment.rl.group_token_advantages`: GRPO
   with process supervision). With ``kl_penalty: reward`` the
   score is first penalised by the sequence KL: r = score - kl_coef * sum_t KL_t (estimator
   ``kl.estimator``, rollout policy against the reference), as in RLOO;
3. ``update_epochs`` passes of minibatches (:meth:`~alignment.recipes.rl_base.RLRecipe.update`)
   with the per-token loss

       clipped surrogate(ratio, A) + kl_coef * k3(pi, pi_ref)   (- entropy_coef * entropy)

   (the k3 term only with ``kl_penalty: loss``), averaged over all response tokens of the
   minibatch (a token-level mean: long responses are not down-weighted per token). The loss's KL
   term always uses the k3 estimator (non-negative, unbiased, with a well-behaved gradient).

The old (rollout) log-probs need their own no-grad forward only when the policy changes within
the step (``update_epochs > 1`` or more than one minibatch); otherwise the single update's own
forward provides them (ratio 1 at the update), saving one forward per sample; ``kl_penalty:
reward`` needs them before the advantages, so it always runs that forward.

Metrics: ``reward/raw``, ``reward/raw_std``, ``reward/shaped`` (score - kl_coef * sequence KL),
``reward/group_std`` (mean within-group std of the scores), ``groups_without_signal`` (share of
groups whose scores were all equal: zero advantage), ``kl`` (mean sequence KL of the rollout
policy to the reference: k3, or ``kl.estimator`` with ``kl_penalty: reward``), ``kl_coef``, ``entropy``, ``loss``, ``loss/policy``, ``loss/kl``, ``clipfrac``,
``approx_kl``, ``response_length``, ``eos_rate``, ``distinct_2`` (pooled over the rollout, all groups), ``grad_norm``,
``reward/token_baseline`` (with ``token_baseline``), with ``process_reward`` ``reward/group_token_baseline``,
``reward/dense_gap``, ``advantage/first_token_abs`` and ``advantage/token_abs``, ``generate_tokens_per_s``,
``rollout_s``, ``update_s`` (plus the base's ``lr``, ``tokens_per_s``, ``samples_per_s``).
"""

from __future__ import annotations

from typing import Any

import torch

from alignment.config import ConfigError, GRPOConfig
from alignment.losses import ppo_policy_loss
from alignment.models import hf_model
from alignment.recipes.rl_base import RLRecipe, UpdatePlan
from alignment.recipes.rollout import PolicyModule, Rollout, token_scores
from alignment.rl import (
    group_advantages,
    group_token_advantages,
    kl_k3,
    masked_mean,
    scored_token_mask,
    sequence_kl,
    token_rewards,
)


class GRPORecipe(RLRecipe):
    """GRPO/RLOO of ``config.model`` on the prompts of ``config.train_path``."""

    name = "grpo"
    config_class = GRPOConfig

    @property
    def samples_per_prompt(self) -> int:
        return self.config.group_size

    def build_models(self) -> None:
        cfg: GRPOConfig = self.config
        self.build_policy()
        if cfg.process_reward:
            pooling = getattr(hf_model(self.reward_model).config, "reward_pooling", None) if self.reward_model else None
            if pooling != "sum":
                raise ConfigError("grpo.process_reward: needs a reward_model trained with pooling 'sum' (its per-token "
                                  f"scores add up to its score); got {pooling or cfg.reward_fn!r}")
            if cfg.kl_penalty == "reward" or cfg.advantage != "grpo":
                raise ConfigError("grpo.process_reward: works with advantage 'grpo' and kl_penalty 'loss'")
        self.train_module = PolicyModule(self.model, self.config.logprob_chunk_size, self.temperature)

    @torch.no_grad()
    def _no_grad_forward(self, roll: Rollout, with_policy: bool) -> dict[str, torch.Tensor]:
        flat: dict[str, list[torch.Tensor]] = {"ref": [], "logps": [], "entropy": [], "token_scores": []}
        for rows in self.micro_batches(range(len(roll))):
            flat["ref"].append(self.reference_logps(roll, rows).float())
            if not (self.config.process_reward or with_policy):
                continue
            batch = roll.collate(rows, self.layout, self.device)  # once for both forwards
            if self.config.process_reward:
                with self.accelerator.autocast():
                    flat["token_scores"].append(token_scores(self.reward_model, batch).float())
            if with_policy:
                with self.accelerator.autocast():
                    out = self.train_module(batch, with_entropy=True)
                flat["logps"].append(out["token_logps"].float())
                flat["entropy"].append(out["entropy"].float())
        return {k: roll.to_grid(torch.cat(v)) for k, v in flat.items() if v}

    def plan_update(self, roll: Rollout) -> UpdatePlan:
        """Group advantages and the reference (and, when the policy moves within the step, the
        rollout) log-probs; the clipped surrogate plus the k3 KL penalty."""
        cfg: GRPOConfig = self.config
        mask = roll.mask
        in_reward = cfg.kl_penalty == "reward"
        single_update = cfg.update_epochs == 1 and cfg.minibatch_size >= len(roll) and not in_reward
        grids = self._no_grad_forward(roll, with_policy=not single_update)
        old = grids.get("logps", torch.zeros(mask.shape, device=self.device))
        entropy = grids.get("entropy", torch.zeros(mask.shape, device=self.device))
        ref = grids["ref"]
        kl_coef = self.kl_ctl.value
        rewards = roll.scores
        if in_reward:
            rewards = roll.scores - kl_coef * sequence_kl(old, ref, mask, cfg.kl.estimator)
        process_metrics: dict[str, float] = {}
        if cfg.process_reward:
            advantages, process_metrics = self._process_advantages(roll, grids["token_scores"])
        else:
            advantages = group_advantages(rewards, cfg.group_size, cfg.advantage, cfg.scale_by_std)[:, None]

        def loss(out: dict[str, torch.Tensor], rows: list[int], m: torch.Tensor):
            logps = out["token_logps"]
            if single_update:  # this forward is the rollout policy: record its log-probs and entropy
                old[rows] = roll.to_grid(logps.detach().float(), rows)
                entropy[rows] = roll.to_grid(out["entropy"].detach().float(), rows)
            adv = advantages[rows].expand(m.shape)[m]
            pg, stats = ppo_policy_loss(logps, old[rows][m], adv, torch.ones_like(logps), cfg.clip_range)
            kl_term = kl_k3(logps, ref[rows][m]).mean()
            if in_reward:  # the KL is in the advantages; its k3 value is only reported
                return pg, {"loss/policy": pg, "loss/kl": kl_term.detach(), **stats}
            return pg + kl_coef * kl_term, {"loss/policy": pg, "loss/kl": kl_term, **stats}

        def finish() -> tuple[float, dict[str, Any]]:
            # after the updates: ``old`` may be filled by them
            seq_kl = sequence_kl(old, ref, mask, cfg.kl.estimator if in_reward else "k3")
            mean_kl = float(seq_kl.mean())
            grouped = roll.scores.view(-1, cfg.group_size)
            return mean_kl, {
                "reward/shaped": float((roll.scores - kl_coef * seq_kl).mean()),
                "reward/group_std": float(grouped.std(dim=1).mean()),
                "groups_without_signal": float((grouped.max(1).values == grouped.min(1).values).float().mean()),
                "kl": mean_kl,
                "kl_coef": kl_coef,
                "entropy": float(masked_mean(entropy, mask)),
                **process_metrics,
            }

        bonus = self.entropy_ctl.value > 0
        return UpdatePlan(loss, finish, with_entropy=single_update or bonus, entropy_grad=bonus)

    def _process_advantages(self, roll: Rollout, grid: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``process_reward``: ``[B, R]`` per-token advantages from the reward model's per-token scores
        ``grid`` (its sequence score is their sum): each scored token's score in units of the running
        scores' std (:func:`alignment.rl.token_rewards`), centred on its group's mean per token and summed
        from each token to the end (:func:`alignment.rl.group_token_advantages`), minus the missing-EOS
        penalty (paid at the end, so every token of the row carries it). Metrics:
        ``reward/group_token_baseline`` (the groups' mean score per token, raw units), ``reward/dense_gap``
        (mean |sum of token scores - the sequence score|: ~0 when the rollout's tokens are the scorer's),
        ``advantage/first_token_abs`` and ``advantage/token_abs`` (mean |A| at each row's first token and
        over all tokens: the credit a token gets when rewards before it no longer count)."""
        cfg: GRPOConfig = self.config
        scored = scored_token_mask(roll.mask, roll.hit_eos)
        scale = self.norm_moments[1] if self.norm_moments[1] > 0 else 1.0
        dense = token_rewards(grid, scored, 0.0, scale)
        adv = group_token_advantages(dense, scored, cfg.group_size, cfg.scale_by_std)
        if cfg.missing_eos_penalty is not None:
            adv = adv - (cfg.missing_eos_penalty / scale) * (~roll.hit_eos).float()[:, None]
        adv = adv * roll.mask
        scored_grid = grid * scored
        per_group = scored_grid.view(-1, cfg.group_size * grid.shape[1]).sum(1) / scored.view(
            -1, cfg.group_size * grid.shape[1]).sum(1).clamp_min(1)
        sums = scored_grid.sum(1)
        return adv, {"reward/group_token_baseline": float(per_group.mean()),
                     "reward/dense_gap": float((sums - roll.raw_scores).abs().mean()),
                     "advantage/first_token_abs": float(adv[:, 0].abs().mean()),
                     "advantage/token_abs": float(masked_mean(adv.abs(), roll.mask))}
