"""Text-generation pyfunc for ``models:/<pipeline>-policy@<alias>`` (MLflow models from code).

``predict`` takes a list of prompts (strings or chat message lists), a DataFrame with a
``prompt`` column, or a single string, and returns one generated continuation per prompt.
Params: ``max_new_tokens`` (32), ``temperature`` (0 = greedy), ``top_p`` (1.0), ``seed`` (0).
The artifact ``model`` is an ordinary Hugging Face folder, or a peft adapter folder whose
base (hub id or path) is read from its adapter_config.json.
"""

import json
import os

import mlflow
from mlflow.pyfunc import PythonModel


def _prompts(model_input):
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, dict) and "prompt" in model_input:
        value = model_input["prompt"]
        return [value] if isinstance(value, str) else list(value)
    return list(model_input)


class PolicyGenerator(PythonModel):
    """Loads the policy once; generates with the tokenizer's chat template for chat prompts."""

    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["model"]
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(self.device).eval()

    def _encode(self, prompt):
        if isinstance(prompt, str) and prompt.startswith("[") and prompt.rstrip().endswith("]"):
            try:
                prompt = json.loads(prompt)
            except ValueError:
                pass
        if isinstance(prompt, (list, tuple)):
            text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return self.tokenizer(prompt, return_tensors="pt")

    def predict(self, context, model_input, params=None):
        import torch

        params = params or {}
        temperature = float(params.get("temperature", 0.0))
        torch.manual_seed(int(params.get("seed", 0)))
        outputs = []
        for prompt in _prompts(model_input):
            enc = self._encode(prompt).to(self.device)
            with torch.no_grad():
                generated = self.model.generate(
                    **enc,
                    max_new_tokens=int(params.get("max_new_tokens", 32)),
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=float(params.get("top_p", 1.0)) if temperature > 0 else None,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = generated[0, enc["input_ids"].shape[1]:]
            outputs.append(self.tokenizer.decode(new_tokens, skip_special_tokens=True))
        return outputs


mlflow.models.set_model(PolicyGenerator())
