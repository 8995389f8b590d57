"""MLflow pyfunc models ("models from code") that serve registered policies and reward models.

These files are copied into each logged model, so they import only torch, transformers and
(for LoRA adapters) peft: a registered model loads wherever those are installed, without
alignflow.
"""

from pathlib import Path

POLICY_MODEL_FILE = Path(__file__).with_name("policy_model.py")
REWARD_MODEL_FILE = Path(__file__).with_name("reward_model.py")
