"""MLflow pyfunc models ("models from code") that serve registered policies and reward models.

``policy_model.py`` and ``reward_model.py`` are copied into each logged model, so they import
only mlflow, torch, transformers (and peft for LoRA adapters): a registered model loads wherever
those are installed, without alignflow. ``signature.py`` (the policy's signature and input
example) and ``card.py`` (model cards) run only when a model is logged.
"""

import shlex
import sys
from pathlib import Path

from tasks.redact import redact_url

POLICY_MODEL_FILE = Path(__file__).with_name("policy_model.py")
REWARD_MODEL_FILE = Path(__file__).with_name("reward_model.py")


def serve_command(tracking_uri: str, model_name: str, alias: str = "champion", port: int = 5001) -> str:
    """A shell command serving ``models:/<model_name>@<alias>`` that works as written from any folder.

    ``mlflow models serve`` starts its HTTP server by running ``uvicorn`` from PATH, so the bin
    folder of this Python environment goes first on PATH; ``--env-manager local`` serves from this
    environment instead of building a new one (which needs the network); port 5001 leaves 5000 to
    the MLflow UI. Credentials in ``tracking_uri`` are masked (the command is printed).
    """
    return (f"PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\" "
            f"MLFLOW_TRACKING_URI={shlex.quote(redact_url(tracking_uri))} "
            f"mlflow models serve -m models:/{model_name}@{alias} --env-manager local --host 127.0.0.1 --port {port}")
