"""Reward model: a scalar head trained with the Bradley–Terry loss on preference pairs.

Data: ``prompt, is_chat, chosen, rejected`` [, ``weight``, ``margin``]. Each response is scored
as ``prompt + response`` (no EOS appended; :func:`alignment.models.score_responses` scores the
same way), pooled at its last token or summed or averaged over its tokens (``pooling``, written
into the saved model's config). Chosen and rejected go through the model in one forward. Per pair (see
:func:`alignment.losses.reward_loss`):

    loss = -log sigma(r_c - r_r - m) + center_coef * (r_c + r_r)^2

averaged with the pair weights (``use_weights``). Metrics: ``loss``, ``accuracy`` (share of pairs
with r_c > r_r), ``margin`` (mean r_c - r_r), ``reward/mean``, ``reward/chosen``,
``reward/rejected``, ``reward/std``.
"""

from __future__ import annotations

from functools import partial

from alignment.batching import ExampleSet, collate_pairs, read_rows, tokenize_pairs
from alignment.config import ConfigError, RewardConfig
from alignment.losses import reward_loss
from alignment.models import ScalarReward, hf_model, load_reward_model, load_tokenizer
from alignment.recipes.supervised import StepOutput, SupervisedRecipe

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class RewardRecipe(SupervisedRecipe):
    """Bradley–Terry reward model on ``config.model`` (causal-LM or encoder backbone)."""

    name = "reward"
    config_class = RewardConfig

    def build_models(self) -> None:
        if self.config.model is None:
            raise ConfigError("reward.model: a backbone is required")
        self.tokenizer = load_tokenizer(self.config.model)
        self.model = load_reward_model(self.config.model, self.tokenizer)
        self.train_module = ScalarReward(self.model)
        if self.train_module.decoder_head:
            hf_model(self.model).config.reward_pooling = self.config.pooling  # saved with the folder
        elif self.config.pooling != "last":
            raise ConfigError("reward.pooling: sum and mean pool a decoder's response tokens; "
                              "encoder backbones pool their own way (use last)")

    def _load(self, path: str, split: str, layout: dict) -> ExampleSet:
        rows = read_rows(path, PAIR_COLUMNS)
        examples, stats = tokenize_pairs(self.tokenizer, rows, self.truncation(), append_eos=False,
                                         with_margin=self.config.margin, source=str(path))
        self.note_data(split, stats, len(examples))
        return ExampleSet(examples, partial(collate_pairs, **layout), stats)

    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        if not self.config.train_path:
            raise ConfigError("reward.train_path: training pairs are required")
        decoder = self.train_module.decoder_head
        layout = self.token_layout(self.model, can_pack=decoder, can_share=decoder)
        train = self._load(self.config.train_path, "train", layout)
        evals = self._load(self.config.eval_path, "eval", layout) if self.config.eval_path else None
        return train, evals

    def compute_loss(self, batch: dict) -> StepOutput:
        rewards = self.train_module(batch)
        n = rewards.shape[0] // 2
        chosen, rejected = rewards[:n], rewards[n:]
        losses = reward_loss(chosen, rejected, batch.get("margin") if self.config.margin else None,
                             center_coef=self.config.center_coef)
        if self.config.use_weights and "weight" in batch:
            loss = (losses * batch["weight"]).sum() / batch["weight"].sum().clamp_min(1e-8)
        else:
            loss = losses.mean()
        diff = (chosen - rejected).detach()
        metrics = {
            "accuracy": (diff > 0).float().mean(),
            "margin": diff.mean(),
            "reward/mean": rewards.detach().mean(),
            "reward/std": rewards.detach().std() if rewards.numel() > 1 else rewards.detach().new_zeros(()),
            "reward/chosen": chosen.detach().mean(),
            "reward/rejected": rejected.detach().mean(),
        }
        return StepOutput(loss=loss, metrics=metrics, tokens=batch["num_tokens"], samples=n)
