"""Supervised fine-tuning: maximise the likelihood of response tokens given the prompt.

Data: demonstrations (``prompt, is_chat, response`` [, ``weight``]) or preference pairs, whose
``chosen`` response is used. Loss on completion tokens only (the prompt is context, never a
target), weighted per example:

    loss = - sum_i w_i sum_t log p(y_i,t | x_i, y_i,<t) / sum_i w_i |y_i|

i.e. the token-mean negative log-likelihood when all weights are 1. ``eval/loss`` is the
same quantity on ``eval_path`` (held-out loss).
"""

from __future__ import annotations

from functools import partial

from alignment.batching import ExampleSet, collate_demonstrations, read_rows, tokenize_demonstrations
from alignment.config import ConfigError, SFTConfig
from alignment.models import CausalLMLogps, load_causal_lm, load_tokenizer
from alignment.recipes.supervised import StepOutput, SupervisedRecipe


class SFTRecipe(SupervisedRecipe):
    """Completion-only SFT of ``config.model`` on ``config.train_path``."""

    name = "sft"
    config_class = SFTConfig

    def build_models(self) -> None:
        if self.config.model is None:
            raise ConfigError("sft.model: a model to fine-tune is required")
        self.tokenizer = load_tokenizer(self.config.model)
        self.model = load_causal_lm(self.config.model)
        self.train_module = CausalLMLogps(self.model, self.config.logprob_chunk_size)

    def _load(self, path: str, split: str, layout: dict) -> ExampleSet:
        rows = read_rows(path, ["prompt"])
        key = "response" if rows and "response" in rows[0] else "chosen"
        if rows and key not in rows[0]:
            raise ValueError(f"{path}: SFT data needs a 'response' column (demonstrations) or 'chosen' (pairs)")
        examples, stats = tokenize_demonstrations(self.tokenizer, rows, self.truncation(), response_key=key,
                                                  source=str(path))
        self.note_data(split, stats, len(examples))
        return ExampleSet(examples, partial(collate_demonstrations, **layout), stats)

    def build_data(self) -> tuple[ExampleSet, ExampleSet | None]:
        if not self.config.train_path:
            raise ConfigError("sft.train_path: training data is required")
        layout = self.token_layout(self.model)
        train = self._load(self.config.train_path, "train", layout)
        evals = self._load(self.config.eval_path, "eval", layout) if self.config.eval_path else None
        return train, evals

    def compute_loss(self, batch: dict) -> StepOutput:
        out = self.train_module(batch)
        weights = batch["weight"]
        token_w = weights.index_select(0, batch["target_seq"])
        loss = -(out["token_logps"] * token_w).sum() / (weights * out["seq_tokens"]).sum().clamp_min(1e-8)
        n_seq = batch["num_sequences"]
        metrics = {"completion_tokens": out["seq_tokens"].mean().detach(),
                   "logps/mean_token": (out["seq_logps"].sum() / out["seq_tokens"].sum().clamp_min(1)).detach()}
        return StepOutput(loss=loss, metrics=metrics, tokens=batch["num_tokens"], samples=n_seq)

