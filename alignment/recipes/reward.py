"""Reward model: a scalar head trained with the Bradley–Terry loss on preference pairs.

Data: ``prompt, is_chat, chosen, rejected`` [, ``weight``, ``margin``]. Each response is scored
as ``prompt + response`` (no EOS appended; :func:`alignment.models.score_responses` scores the
same way), pooled at its last token or summed or averaged over its tokens (``pooling``, written
into the saved model's config). Chosen and rejected go through the model in one forward; with
``share_responses`` each distinct response of a batch's prompt goes through once. Per pair (see
:func:`alignment.losses.reward_loss`):

    loss = -log sigma(r_c - r_r - m) + center_coef * (r_c + r_r)^2

averaged with the pair weights (``use_weights``). With ``calibrate`` the head is divided, after
training, by the temperature that fits the eval pairs best (:func:`fit_temperature`). Metrics: ``loss``, ``accuracy`` (share of pairs
with r_c > r_r), ``margin`` (mean r_c - r_r), ``reward/mean``, ``reward/chosen``,
``reward/rejected``, ``reward/std``.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from alignment.batching import ExampleSet, collate_pairs, pair_halves, read_rows, to_device, tokenize_pairs
from alignment.config import ConfigError, RewardConfig
from alignment.losses import reward_loss
from alignment.models import ScalarReward, hf_model, load_reward_model, load_tokenizer
from alignment.recipes.supervised import StepOutput, SupervisedRecipe

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def fit_temperature(margins: torch.Tensor, low: float = 1e-2, high: float = 1e2, iterations: int = 60) -> float:
    """The temperature T in [low, high] minimising the Bradley–Terry log-loss of margins d = r_c − r_r:

        L(a) = mean_i log(1 + exp(−a d_i)),   a = 1/T,
        L'(a) = −mean_i d_i σ(−a d_i)

    L is convex in a, so L' rises with a and its root is found by bisection on log a (T = high when
    the model is no better than chance, T = low when every margin is positive: no finite optimum).
    """
    d = margins.detach().double().flatten()
    slope = lambda a: float(-(d * torch.sigmoid(-a * d)).mean())  # noqa: E731
    lo, hi = math.log(1.0 / high), math.log(1.0 / low)
    if slope(math.exp(lo)) >= 0:
        return high
    if slope(math.exp(hi)) <= 0:
        return low
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(math.exp(mid)) < 0 else (lo, mid)
    return 1.0 / math.exp(0.5 * (lo + hi))


class RewardRecipe(SupervisedRecipe):
    """Bradley–Terry reward model on ``config.model`` (causal-LM or encoder backbone)."""

    name = "reward"
    config_class = RewardConfig
    temperature: float | None = None
    """The temperature folded into the head (``calibrate``), once."""

    def build_models(self) -> None:
        if self.config.model is None:
            raise ConfigError("reward.model: a backbone is required")
        self.tokenizer = load_tokenizer(self.config.model)
        self.model = load_reward_model(self.config.model, self.tokenizer)
        self.train_module = ScalarReward(self.model)
        if self.train_module.decoder_head:
            config = hf_model(self.model).config  # saved with the folder: how every scorer reads it
            config.reward_pooling = self.config.pooling
            config.reward_max_length = self.config.max_length
            config.reward_max_prompt_length = self.config.max_prompt_length
        elif self.config.pooling != "last":
            raise ConfigError("reward.pooling: sum and mean pool a decoder's response tokens; "
                              "encoder backbones pool their own way (use last)")

    def _load(self, path: str, split: str, layout: dict) -> ExampleSet:
        rows = read_rows(path, PAIR_COLUMNS)
        examples, stats = tokenize_pairs(self.tokenizer, rows, self.truncation(), append_eos=False,
                                         with_margin=self.config.margin, source=str(path))
        self.note_data(split, stats, len(examples))
        return ExampleSet(examples, partial(collate_pairs, **layout), stats)

    def _extend(self, train: ExampleSet, extra: ExampleSet) -> ExampleSet:
        """``train`` followed by ``extra`` (row indices continue after ``train``'s), stats summed."""
        offset = 1 + max((e["index"] for e in train.examples), default=-1)
        examples = train.examples + [{**e, "index": e["index"] + offset} for e in extra.examples]
        stats = {k: train.stats.get(k, 0) + extra.stats.get(k, 0) for k in {*train.stats, *extra.stats}}
        self.note_data("train", stats, len(examples))
        return ExampleSet(examples, train.collate, stats)

    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        if not self.config.train_path:
            raise ConfigError("reward.train_path: training pairs are required")
        decoder = self.train_module.decoder_head
        layout = self.token_layout(self.model, can_pack=decoder, can_share=decoder)
        train = self._load(self.config.train_path, "train", layout)
        for i, path in enumerate(self.config.extra_train_paths):  # one data-stats entry per file
            train = self._extend(train, self._load(path, f"train_extra_{i}", layout))
        evals = self._load(self.config.eval_path, "eval", layout) if self.config.eval_path else None
        return train, evals

    def save(self, finished: bool = True) -> None:
        """With ``calibrate``, fold the eval pairs' temperature into the score head before ``final/`` is written."""
        if finished and self.config.calibrate and self.temperature is None:
            self.temperature = self.calibrate()
        super().save(finished)

    @torch.no_grad()
    def calibrate(self) -> float:
        """Fit T on the eval pairs' margins (:func:`fit_temperature`; every process scores the whole
        eval set, so all fold the same T) and divide the score head's parameters by it."""
        if self.eval_set is None or len(self.eval_set) == 0:
            raise ConfigError("reward.calibrate: the temperature is fitted on eval pairs (set eval_path)")
        margins = []
        self.train_module.eval()
        try:
            for start in range(0, len(self.eval_set), self.config.batch_size):
                idx = range(start, min(start + self.config.batch_size, len(self.eval_set)))
                batch = to_device(self.eval_set.collate([self.eval_set[i] for i in idx]), self.device)
                with self.accelerator.autocast():
                    chosen, rejected = pair_halves(self.train_module(batch).float(), batch)
                margins.append(chosen - rejected)
        finally:
            self.train_module.train()
        temperature = fit_temperature(torch.cat(margins))
        inner = hf_model(self.accelerator.unwrap_model(self.model))
        head = inner.score if hasattr(inner, "score") else inner.classifier  # decoder / encoder heads
        for param in head.parameters():
            param.div_(temperature)
        inner.config.reward_temperature = temperature
        return temperature

    def summary(self, finished: bool) -> dict:
        out = super().summary(finished)
        if self.temperature is not None:
            out["reward_temperature"] = self.temperature
        return out

    def compute_loss(self, batch: dict) -> StepOutput:
        chosen, rejected = pair_halves(self.train_module(batch), batch)
        rewards = torch.cat([chosen, rejected])
        n = chosen.shape[0]
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
