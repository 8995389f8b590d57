"""GRPO / RLOO: critic-free policy optimisation with several samples per prompt.

Each step (shared conventions in :mod:`alignment.recipes.rl_base`):

1. sample ``group_size`` responses for each of ``rollout_batch_size`` prompts and score them
   (normalised by ``reward_norm``);
2. sequence advantages within each group (:func:`alignment.rl.group_advantages`): ``grpo``
   (r - mean) / std (``scale_by_std: false`` = Dr. GRPO), or ``rloo`` (leave-one-out baseline);
   every token of a response gets its sequence's advantage. With ``kl_penalty: reward`` the
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
``reward/token_baseline`` (with ``token_baseline``), ``generate_tokens_per_s``,
``rollout_s``, ``update_s`` (plus the base's ``lr``, ``tokens_per_s``, ``samples_per_s``).
"""

from __future__ import annotations

from typing import Any

import torch

from alignment.config import GRPOConfig
from alignment.losses import ppo_policy_loss
from alignment.recipes.rl_base import RLRecipe, UpdatePlan
from alignment.recipes.rollout import PolicyModule, Rollout
from alignment.rl import group_advantages, kl_k3, masked_mean, sequence_kl


class GRPORecipe(RLRecipe):
    """GRPO/RLOO of ``config.model`` on the prompts of ``config.train_path``."""

    name = "grpo"
    config_class = GRPOConfig

    @property
    def samples_per_prompt(self) -> int:
        return self.config.group_size

    def build_models(self) -> None:
        self.build_policy()
        self.train_module = PolicyModule(self.model, self.config.logprob_chunk_size, self.temperature)

    @torch.no_grad()
    def _no_grad_forward(self, roll: Rollout, with_policy: bool) -> dict[str, torch.Tensor]:
        flat: dict[str, list[torch.Tensor]] = {"ref": [], "logps": [], "entropy": []}
        for rows in self.micro_batches(range(len(roll))):
            flat["ref"].append(self.reference_logps(roll, rows).float())
            if with_policy:
                batch = roll.collate(rows, self.layout, self.device)
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
        advantages = group_advantages(rewards, cfg.group_size, cfg.advantage, cfg.scale_by_std)

        def loss(out: dict[str, torch.Tensor], rows: list[int], m: torch.Tensor):
            logps = out["token_logps"]
            if single_update:  # this forward is the rollout policy: record its log-probs and entropy
                old[rows] = roll.to_grid(logps.detach().float(), rows)
                entropy[rows] = roll.to_grid(out["entropy"].detach().float(), rows)
            adv = advantages[rows][:, None].expand(m.shape)[m]
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
            }

        bonus = self.entropy_ctl.value > 0
        return UpdatePlan(loss, finish, with_entropy=single_update or bonus, entropy_grad=bonus)
