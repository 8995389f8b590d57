"""The logged policy's MLflow signature and input example (read by :mod:`tasks.tracking.registry`).

The signature tells ``mlflow models serve`` and ``pyfunc.predict`` which request params exist
(without a params schema MLflow drops every param with a warning): :data:`POLICY_PARAMS`, the
same names and defaults as ``PARAMS`` in ``policy_model.py`` (that file is copied into each
model and cannot import this one; a test keeps the two equal). Inputs are one column of any
type, because a prompt is a string *or* a chat message list; ``policy_model.prompts_of``
checks them and names a bad one.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, DataType, ParamSchema, ParamSpec, Schema

POLICY_PARAMS: dict[str, int | float] = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0}
"""Generation params a request may set, with their defaults (temperature 0: greedy)."""

EXAMPLE_MAX_BYTES = 2 << 30
"""Weights above this size are logged without an input example: MLflow validates an example by
loading the model into the logging process, which for a large model costs its memory and minutes."""


def policy_signature() -> ModelSignature:
    """Prompts in (string or message list), one string out per prompt, :data:`POLICY_PARAMS` as params."""
    params = [ParamSpec(name, DataType.long if isinstance(default, int) else DataType.double, default)
              for name, default in POLICY_PARAMS.items()]
    return ModelSignature(inputs=Schema([ColSpec(AnyType())]), outputs=Schema([ColSpec(DataType.string)]),
                          params=ParamSchema(params))


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether a saved tokenizer carries a chat template (in its config or a ``chat_template.jinja``)."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("chat_template")) if config.exists() else False
    except ValueError:
        return False


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files in a model folder (safetensors, or a legacy ``*.bin``)."""
    folder = Path(model_dir)
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))


def policy_input_example(model_dir: str | Path) -> tuple[list, dict] | None:
    """``(prompts, params)`` for the logged example: a plain prompt, plus a chat prompt when the
    tokenizer has a chat template; None for weights above :data:`EXAMPLE_MAX_BYTES` and for an
    adapter folder (its base, of unknown size, would load from the hub)."""
    if (Path(model_dir) / "adapter_config.json").exists() or weights_bytes(model_dir) > EXAMPLE_MAX_BYTES:
        return None
    prompts: list = ["Write a one-line review of a film you liked."]
    if has_chat_template(model_dir):
        prompts.append([{"role": "user", "content": "Describe the film in one sentence."}])
    return prompts, {"max_new_tokens": 8}
