"""Settings that run code come from the operator's config file, never from a deployment run.

Whoever may start a deployment run (Prefect UI, API, ``prefect deployment run --param``) chooses
its parameters ``config`` and ``overrides``. Some settings execute code on the worker:
``trust_remote_code`` (model code from the hub), ``reward_fn`` (a Python function imported by
name), ``accelerate_config`` (launch settings), and every model path (a folder or hub id whose
weights, tokenizer and config are loaded); others choose which files on the worker are read and
logged to MLflow, or written (the home, the landing folder, sources, ledger and cache folders).
In a deployment run those may only have the values
the deployment itself resolves to (its config file plus the overrides it was deployed with, e.g.
``alignflow serve --set ...``); model paths may also name an entry of ``pipeline.allowed_models``.
The ``config`` path must be the deployment's own. Runs started outside a deployment (``alignflow
run --set``, Python) are the operator's and are not checked.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from alignment.config import ConfigError
from tasks.config import PipelineConfig, load_pipeline_config

CODE_SETTINGS = frozenset({"trust_remote_code", "reward_fn", "accelerate_config", "allowed_models"})
"""Setting names (anywhere in the config tree) that run code or widen what may run."""
MODEL_PATHS = frozenset({"name_or_path", "tokenizer", "reward_model", "revision"})
"""Setting names that choose which model files (and code) are loaded."""
DATA_PATHS = frozenset({"home", "landing_dir", "sources", "ledger_path", "cache_dir", "ref_cache_dir"})
"""Setting names that choose which files on the worker are read (and logged to MLflow) or written."""


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _guarded(path: str) -> str | None:
    name = path.rsplit(".", 1)[-1]
    if name in CODE_SETTINGS or name in DATA_PATHS:
        return "code"
    return "model" if name in MODEL_PATHS else None


def untrusted_changes(trusted: PipelineConfig, requested: PipelineConfig) -> list[str]:
    """Dotted names of code-executing settings that ``requested`` sets (to a non-empty, true
    value) differently from ``trusted``; a model path matching ``trusted.pipeline.allowed_models``
    is allowed. A section present only in ``requested`` is compared leaf by leaf against nothing."""
    old = _leaves(trusted.model_dump(mode="json"))
    new = _leaves(requested.model_dump(mode="json"))
    allowed = trusted.pipeline.allowed_models
    bad = []
    for path in sorted(set(old) | set(new)):
        kind = _guarded(path)
        value = new.get(path)
        if kind is None or not value or value == old.get(path):  # unset/False/empty runs nothing
            continue
        if kind == "model" and isinstance(value, str) and any(fnmatchcase(value, p) for p in allowed):
            continue
        bad.append(path)
    return bad


def check_run_parameters(config: str | None, overrides: list[str] | None,
                         deployed: dict[str, Any] | None) -> None:
    """Refuse a deployment run's parameters that change code-executing settings.

    ``deployed`` is the deployment's own parameters (None: not a deployment run, nothing to
    check). Raises ConfigError naming the parameter or each offending field."""
    if deployed is None:
        return
    own_config = deployed.get("config")
    if (config or None) != (own_config or None):
        raise ConfigError(f"config: a deployment run reads its deployment's config file ({own_config!r}); "
                          f"{config!r} was passed as a run parameter. Deploy another config instead.")
    trusted = load_pipeline_config(own_config, list(deployed.get("overrides") or []))
    requested = load_pipeline_config(config, list(overrides or []))
    bad = untrusted_changes(trusted, requested)
    if bad:
        raise ConfigError(
            f"{', '.join(bad)}: cannot be set by a deployment run's overrides (they choose code or files "
            "on the worker); set them in the config file, or list allowed model paths in pipeline.allowed_models")


def deployment_parameters() -> dict[str, Any] | None:
    """The parameters the current flow run's deployment was created with; None outside a
    deployment run. Reads the deployment from the Prefect API (the flow run's own parameters
    are the requested ones, not the trusted ones)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    deployment_id = deployment.id
    if not deployment_id:
        return None
    with get_client(sync_client=True) as client:
        return dict(client.read_deployment(UUID(str(deployment_id))).parameters or {})


def check_deployment_run(config: str | None, overrides: list[str] | None) -> None:
    """:func:`check_run_parameters` for the current flow run (a no-op outside deployments)."""
    check_run_parameters(config, overrides, deployment_parameters())
