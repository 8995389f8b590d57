"""Text-generation pyfunc for ``models:/<pipeline>-policy@<alias>`` (MLflow models from code).

Input: prompts, each a plain string or a chat message list (``[{"role": ..., "content": ...}]``,
or its JSON text, the pipeline's stored form). ``predict`` takes a list of them (mixed is fine),
a single string, a dict ``{"prompt": [...]}`` / ``{"messages": [...]}``, or a DataFrame of one
column (MLflow's schema enforcement keeps only the first column of a DataFrame). Over HTTP
(``mlflow models serve``): ``{"inputs": ["The movie", [{"role": "user", "content": "Review
it."}]], "params": {"max_new_tokens": 20}}``, or ``{"dataframe_records": [{"prompt": ...}]}``.
Output: one generated continuation per prompt, in order.

Params (the logged signature's params schema, :data:`PARAMS`; unknown names are refused by
MLflow): ``max_new_tokens`` (32), ``temperature`` (0 = greedy), ``top_p`` (1.0 = off),
``top_k`` (0 = off), ``seed`` (0; sampling is reproducible per request). Out-of-range values
and chat prompts for a tokenizer without a chat template raise an error naming the value
(HTTP 400).

The artifact ``model`` is an ordinary Hugging Face folder, or a peft adapter folder whose base
(hub id or path) is read from its adapter_config.json. This file is copied into each logged
model: it imports only mlflow, torch, transformers (and peft for adapters).
"""

import json
import os

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

PARAMS = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
"""Generation params and their defaults (the signature's params schema is built from these)."""


def _bad(message):
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _is_chat(value):
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _expand(value):
    """The prompts one input cell holds: a string (chat JSON text decoded), a message list, a
    single message, or a list of those."""
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays from schema enforcement
        value = value.tolist()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                decoded = json.loads(text)
            except ValueError:
                return [value]
            if _is_chat(decoded):
                return [decoded]
        return [value]
    if isinstance(value, dict):
        if "role" in value and "content" in value:
            return [[value]]
        for key in ("messages", "prompt", "prompts", "inputs"):
            if key in value:
                return _expand(value[key])
        raise _bad(f"a prompt must be a string or a list of role/content messages, got a dict with {sorted(value)}")
    if _is_chat(value):
        return [[dict(m) for m in value]]
    if isinstance(value, (list, tuple)):
        return [p for item in value for p in _expand(item)]
    raise _bad(f"a prompt must be a string or a list of role/content messages, got {type(value).__name__}")


def _missing(value):
    if value is None:
        return True
    try:
        return value != value  # NaN
    except Exception:
        return False


def prompts_of(model_input):
    """Every prompt of a predict input, in order (see the module docstring)."""
    if hasattr(model_input, "columns"):  # a DataFrame
        named = [c for c in ("messages", "prompt") if c in model_input.columns]
        out = []
        for _, row in model_input.iterrows():
            cells = [row[c] for c in (named or model_input.columns) if not _missing(row[c])]
            if not cells:
                raise _bad("an input row holds no prompt")
            if not named and len(cells) > 1 and all(isinstance(c, dict) for c in cells):
                out.append([dict(c) for c in cells])  # one message list spread over columns
            else:
                out.extend(_expand(cells[0]))
        return out
    return _expand(model_input)


def generation_params(params):
    """Checked generation settings from request params (defaults from :data:`PARAMS`)."""
    merged = {**PARAMS, **(params or {})}
    unknown = sorted(set(merged) - set(PARAMS))
    if unknown:
        raise _bad(f"unknown params {unknown}; known: {sorted(PARAMS)}")
    out = {"max_new_tokens": int(merged["max_new_tokens"]), "temperature": float(merged["temperature"]),
           "top_p": float(merged["top_p"]), "top_k": int(merged["top_k"]), "seed": int(merged["seed"])}
    if out["max_new_tokens"] < 1:
        raise _bad(f"max_new_tokens must be >= 1, got {out['max_new_tokens']}")
    if out["temperature"] < 0:
        raise _bad(f"temperature must be >= 0 (0: greedy), got {out['temperature']}")
    if not 0 < out["top_p"] <= 1:
        raise _bad(f"top_p must be in (0, 1], got {out['top_p']}")
    if out["top_k"] < 0:
        raise _bad(f"top_k must be >= 0 (0: off), got {out['top_k']}")
    return out


def _preload_bitsandbytes():
    """Import bitsandbytes (where installed) with the ``kernels`` package hidden, before peft imports it.

    peft imports bitsandbytes whenever it is installed, and on a CPU with AVX-512 bf16 that import
    asks the Hugging Face Hub, through ``kernels``, for compiled code that serving never runs. The
    same guard as ``alignment.models.import_bitsandbytes``, repeated because this file travels into
    each logged model without alignflow."""
    import importlib.util
    import logging
    import sys

    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError inside bitsandbytes
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    finally:
        cpu_ops.setLevel(level)
        if kernels is missing:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = kernels


class PolicyGenerator(PythonModel):
    """Loads the policy once; generates with the tokenizer's chat template for chat prompts."""

    def load_context(self, context):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["model"]
        if os.path.exists(os.path.join(path, "adapter_config.json")):
            _preload_bitsandbytes()
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
        if isinstance(prompt, list):
            if not getattr(self.tokenizer, "chat_template", None):
                raise _bad("this model's tokenizer has no chat template: send plain-text prompts")
            text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        return self.tokenizer(prompt, return_tensors="pt")

    def predict(self, context, model_input, params=None):
        import torch

        settings = generation_params(params)
        sample = settings["temperature"] > 0
        generator_kwargs = {"max_new_tokens": settings["max_new_tokens"], "do_sample": sample,
                            "pad_token_id": self.tokenizer.pad_token_id}
        if sample:
            generator_kwargs.update(temperature=settings["temperature"], top_p=settings["top_p"],
                                    top_k=settings["top_k"] or None)
        torch.manual_seed(settings["seed"])
        outputs = []
        for prompt in prompts_of(model_input):
            enc = self._encode(prompt).to(self.device)
            with torch.no_grad():
                generated = self.model.generate(**enc, **generator_kwargs)
            outputs.append(self.tokenizer.decode(generated[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return outputs


mlflow.models.set_model(PolicyGenerator())
