"""Reward-scoring pyfunc for ``models:/<pipeline>-reward@<alias>`` (MLflow models from code).

``predict`` takes a DataFrame (or list of dicts) with ``prompt`` and ``response`` columns and
returns one scalar reward per row. The artifact ``model`` is a Hugging Face sequence
classification folder with one label. A model whose config says ``reward_pooling: sum`` or
``mean`` (the reward recipe's ``pooling``) is scored as the recipe trains it: prompt and response
tokenized apart (the prompt with the tokenizer's special tokens, or through the chat template with
the generation prompt; the response without), the head applied to each response token's last
hidden state, summed or averaged.
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

    def _text(self, prompt, response):
        prompt = _chat_or_text(prompt)
        if isinstance(prompt, (list, tuple)):
            messages = list(prompt) + [{"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + response

    def _prompt_ids(self, prompt):
        prompt = _chat_or_text(prompt)
        if isinstance(prompt, (list, tuple)):
            text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        return list(ids) or [start]

    def _pooled(self, prompt, response, pooling):
        import torch

        prompt_ids = self._prompt_ids(prompt)
        response_ids = list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([prompt_ids + response_ids], device=self.device)
        hidden = self.model.base_model(input_ids=ids).last_hidden_state[0]
        scores = self.model.score(hidden[len(prompt_ids):] if response_ids else hidden[-1:])[:, 0]
        return float(scores.sum() if pooling == "sum" else scores.mean())

    def predict(self, context, model_input, params=None):
        import torch

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        pooling = getattr(self.model.config, "reward_pooling", None) or "last"
        scores = []
        for row in rows:
            with torch.no_grad():
                if pooling != "last":
                    scores.append(self._pooled(row["prompt"], row["response"], pooling))
                    continue
                enc = self.tokenizer(self._text(row["prompt"], row["response"]), return_tensors="pt").to(self.device)
                scores.append(float(self.model(**enc).logits[0, 0]))
        return scores


mlflow.models.set_model(RewardScorer())


def _chat_or_text(prompt):
    """A prompt as the request gave it, or a chat message list when it is one as JSON text."""
    if isinstance(prompt, str) and prompt.startswith("["):
        try:
            return json.loads(prompt)
        except ValueError:
            pass
    return prompt
