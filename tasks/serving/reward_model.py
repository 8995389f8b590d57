"""Reward-scoring pyfunc for ``models:/<pipeline>-reward@<alias>`` (MLflow models from code).

``predict`` takes a DataFrame (or list of dicts) with ``prompt`` and ``response`` columns and
returns one scalar reward per row. The artifact ``model`` is a Hugging Face sequence
classification folder with one label, scored as the reward recipe trains it and the gate's judge
(``alignment.models.score_responses``) scores it: prompt and response tokenized apart (the prompt
with the tokenizer's special tokens, or through the chat template with the generation prompt; the
response without special tokens, no EOS), cut as the recipe cut them (``reward_max_prompt_length``
keeps the prompt's end and a leading BOS, ``reward_max_length`` the response's start; a folder
without them is cut at the model's positions), then the head on the last token's hidden state, or
on each response token's, summed or averaged, as the config's ``reward_pooling`` says (an encoder
backbone: its own pooling and head). This file is loaded alone by MLflow (models from code), so it
repeats those rules rather than importing them; tests/unit/test_reward_pooling.py holds the two to
the same scores.
"""

import json

import mlflow
from mlflow.pyfunc import PythonModel


class RewardScorer(PythonModel):
    """Scores prompt + response with the reward model's scalar head."""

    def load_context(self, context):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()

    def _prompt_ids(self, prompt):
        prompt = _chat_or_text(prompt)
        if isinstance(prompt, (list, tuple)):
            text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        return list(ids) or [start]

    def _cut(self, prompt_ids, response_ids):
        """The reward recipe's truncation (``alignment.batching.Truncation``, mode ``truncate``)."""
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or 10**9
        max_length = min(getattr(config, "reward_max_length", None) or positions, positions)
        max_prompt = min(getattr(config, "reward_max_prompt_length", None) or max_length - 1, max_length - 1)
        if len(prompt_ids) > max_prompt:
            keep_bos = self.tokenizer.bos_token_id is not None and prompt_ids[0] == self.tokenizer.bos_token_id
            tail = prompt_ids[len(prompt_ids) - (max_prompt - keep_bos):]
            prompt_ids = ([prompt_ids[0]] if keep_bos else []) + tail
        return prompt_ids, response_ids[: max_length - len(prompt_ids)]

    def _score(self, prompt, response, pooling):
        import torch

        prompt_ids, response_ids = self._cut(self._prompt_ids(prompt),
                                             list(self.tokenizer(response, add_special_tokens=False)["input_ids"]))
        ids = torch.tensor([prompt_ids + response_ids], device=self.device)
        if not hasattr(self.model, "score"):  # an encoder backbone: its own pooling and head
            return float(self.model(input_ids=ids).logits[0, 0])
        hidden = self.model.base_model(input_ids=ids).last_hidden_state[0]
        if pooling == "last" or not response_ids:
            return float(self.model.score(hidden[-1:])[0, 0])
        scores = self.model.score(hidden[len(prompt_ids):])[:, 0]
        return float(scores.sum() if pooling == "sum" else scores.mean())

    def predict(self, context, model_input, params=None):
        import torch

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        pooling = getattr(self.model.config, "reward_pooling", None) or "last"
        with torch.no_grad():
            return [self._score(row["prompt"], row["response"], pooling) for row in rows]


mlflow.models.set_model(RewardScorer())


def _chat_or_text(prompt):
    """A prompt as the request gave it, or a chat message list when it is one as JSON text."""
    if isinstance(prompt, str) and prompt.startswith("["):
        try:
            return json.loads(prompt)
        except ValueError:
            pass
    return prompt
