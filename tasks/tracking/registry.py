"""The model registry: ``<pipeline>-policy`` and ``<pipeline>-reward`` (names built only by
:func:`policy_model_name` and :func:`reward_model_name`), their versions, tags and aliases.

Alias ``champion`` is what production serves, ``challenger`` the last candidate. Promotion
history lives in version tags (``alignflow.promoted_at``, ``alignflow.rolled_back_at``: UTC
times in ISO 8601), one write per version, so two pipelines promoting at once cannot lose each
other's history. The policy is logged with a signature (params ``max_new_tokens``,
``temperature``, ...) and an input example (:mod:`tasks.serving.signature`); each version's
description is its model card (:mod:`tasks.serving.card`).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks.serving import POLICY_MODEL_FILE, REWARD_MODEL_FILE
from tasks.serving.signature import policy_input_example, policy_signature

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTED_AT = "alignflow.promoted_at"
ROLLED_BACK_AT = "alignflow.rolled_back_at"


def policy_model_name(pipeline: str) -> str:
    """The registered policy model of a pipeline."""
    return f"{pipeline}-policy"


def reward_model_name(pipeline: str) -> str:
    """The registered reward model of a pipeline."""
    return f"{pipeline}-reward"


def utc_timestamp() -> str:
    """Now in UTC, ISO 8601 (``2026-05-04T03:02:01.123456+00:00``): what time tags hold."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def tag_time(value: str) -> float:
    """Seconds since the epoch of a time tag: ISO 8601, or the bare epoch seconds older versions wrote."""
    try:
        return float(value)
    except ValueError:
        return datetime.fromisoformat(value).timestamp()


def _log_pyfunc(run_id: str, code_file: Path, model_dir: Path, name: str, registered_name: str,
                tags: dict[str, str], signature: Any = None, input_example: Any = None) -> str:
    """Log a models-from-code pyfunc with the HF folder as its artifact and register it."""
    requirements = ["torch", "transformers", "safetensors"]
    if (Path(model_dir) / "adapter_config.json").exists():
        requirements.append("peft")
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(code_file),
            artifacts={"model": str(model_dir)},
            pip_requirements=requirements,
            signature=signature,
            input_example=input_example,
        )
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    return str(version.version)


def log_policy(run_id: str, model_dir: Path, pipeline: str, tags: dict[str, str]) -> str:
    """Log the policy folder as a text-generation pyfunc; register a new ``<pipeline>-policy`` version."""
    return _log_pyfunc(run_id, POLICY_MODEL_FILE, model_dir, "policy", policy_model_name(pipeline), tags,
                       signature=policy_signature(), input_example=policy_input_example(model_dir))


def log_reward_model(run_id: str, model_dir: Path, pipeline: str, tags: dict[str, str]) -> str:
    """Log the reward model as a scoring pyfunc; register a new ``<pipeline>-reward`` version."""
    return _log_pyfunc(run_id, REWARD_MODEL_FILE, model_dir, "reward_model", reward_model_name(pipeline), tags)


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, or None (no model, or alias unset)."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def model_version(name: str, version: str) -> Any:
    """One model version (MLflow ``ModelVersion``: ``version``, ``creation_timestamp``, ``tags``, ...).

    Raises MlflowException for an unknown model or version."""
    return MlflowClient().get_model_version(name, version)


def version_tags(name: str, version: str) -> dict[str, str]:
    """Tags of one model version."""
    return dict(MlflowClient().get_model_version(name, version).tags)


def find_version(name: str, tag: str, value: str) -> str | None:
    """The newest version of ``name`` whose tag ``tag`` equals ``value`` (idempotent registration)."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    hits = [v for v in versions if v.tags.get(tag) == value]
    return str(max(int(v.version) for v in hits)) if hits else None


def set_version_description(name: str, version: str, text: str) -> None:
    """Set a model version's description (its model card, Markdown)."""
    MlflowClient().update_model_version(name, version, description=text)


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    """Set several tags on a model version."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _write_alias(client: MlflowClient, name: str, alias: str, version: str, attempts: int = 3) -> None:
    """Set an alias, retrying when another process created the same alias row at the same moment.

    MLflow writes an alias as "select, then insert or update"; two runs setting an alias that
    does not exist yet both insert, and the loser gets a unique-constraint error (seen on
    SQLite; PostgreSQL behaves alike). On retry the row exists and is updated.
    """
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as err:
            text = str(err)
            if attempt == attempts - 1 or not any(m in text for m in ("UNIQUE constraint", "IntegrityError",
                                                                         "duplicate key")):
                raise
            time.sleep(0.2 * (attempt + 1))


def promote(name: str, version: str, reason: str = "") -> None:
    """Point ``champion`` at ``version`` and record the promotion time on the version."""
    client = MlflowClient()
    client.get_model_version(name, version)  # raises for an unknown version
    client.set_model_version_tag(name, version, PROMOTED_AT, utc_timestamp())
    if reason:
        client.set_model_version_tag(name, version, "alignflow.promotion_reason", reason)
    if ROLLED_BACK_AT in version_tags(name, version):  # promoted again after a rollback
        client.delete_model_version_tag(name, version, ROLLED_BACK_AT)
    _write_alias(client, name, CHAMPION, version)


def champion_history(name: str) -> list[str]:
    """Versions ever promoted and not rolled back, oldest promotion first."""
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    live = [v for v in versions if PROMOTED_AT in v.tags and ROLLED_BACK_AT not in v.tags]
    return [str(v.version) for v in sorted(live, key=lambda v: tag_time(v.tags[PROMOTED_AT]))]


def rollback(name: str) -> tuple[str, str]:
    """Move ``champion`` back to the previously promoted version. Returns (from, to).

    Raises LookupError when there is no champion or no earlier promoted version.
    """
    current = alias_version(name, CHAMPION)
    if current is None:
        raise LookupError(f"{name} has no champion to roll back")
    history = [v for v in champion_history(name) if v != current]
    if not history:
        raise LookupError(f"{name}: version {current} is the only promoted version; nothing to roll back to")
    previous = history[-1]
    client = MlflowClient()
    client.set_model_version_tag(name, current, ROLLED_BACK_AT, utc_timestamp())
    _write_alias(client, name, CHAMPION, previous)
    return current, previous


def set_alias(name: str, alias: str, version: str) -> None:
    """Point any alias at a version."""
    _write_alias(MlflowClient(), name, alias, version)


def download_model(name: str, alias_or_version: str, dest: Path) -> Path:
    """Download a registered model's HF folder (the pyfunc's ``model`` artifact) to ``dest``.

    Returns the HF folder. Raises MlflowException for an unknown model or alias.
    """
    ref = f"models:/{name}@{alias_or_version}" if not alias_or_version.isdigit() else f"models:/{name}/{alias_or_version}"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dest)))
    candidates = [p.parent for p in local.rglob("config.json") if "artifacts" in p.parts]
    if not candidates:
        raise FileNotFoundError(f"{ref}: no model folder in its artifacts")
    return min(candidates, key=lambda p: len(p.parts))


def model_versions(name: str) -> list[Any]:
    """Every version of a registered model (MLflow ``ModelVersion``), oldest first; [] for none."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    return sorted(versions, key=lambda v: int(v.version))
