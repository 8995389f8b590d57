"""Shared helpers for the pipeline integration tests: the tiny config and MLflow look-ups."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def overrides(home: Path, demo_cache: Path, *extra: str) -> list[str]:
    """Tiny config pointed at a test's own home, sharing one demo base-model cache."""
    return [f"pipeline.home={home}", f"demo.cache_dir={demo_cache}", *extra]


def use_store(home: Path) -> MlflowClient:
    """Point MLflow at a test home's embedded store.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; that is put back, or a
    later pipeline in this process would take it for a user's server and write here.
    """
    uri = f"sqlite:///{home}/mlflow.db"
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    return MlflowClient()


def child_runs(client: MlflowClient, parent_run_id: str) -> dict[str, list]:
    """Child runs of a parent, grouped by run name."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.info.run_name, []).append(run)
    return out
