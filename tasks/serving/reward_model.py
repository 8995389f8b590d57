"""Reward-scoring pyfunc for ``models:/<pipeline>-reward@<alias>`` (MLflow models from code).

``predict`` takes a DataFrame (or list of dicts) with ``prompt`` and ``response`` columns and
returns one scalar reward per row. The artifact ``model`` is a Hugging Face sequence
classification folder with one label.
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
        if isinstance(prompt, str) and prompt.startswith("["):
            try:
                prompt = json.loads(prompt)
            except ValueError:
                pass
        if isinstance(prompt, (list, tuple)):
            messages = list(prompt) + [{"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + response

    def predict(self, context, model_input, params=None):
        import torch

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        scores = []
        for row in rows:
            enc = self.tokenizer(self._text(row["prompt"], row["response"]), return_tensors="pt").to(self.device)
            with torch.no_grad():
                scores.append(float(self.model(**enc).logits[0, 0]))
        return scores


mlflow.models.set_model(RewardScorer())
