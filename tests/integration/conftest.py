"""Integration fixtures. The session's Prefect test server (``prefect_harness``,
``prefect_api_url``) and the shared demo base-model cache (``demo_cache``) are in
tests/conftest.py, shared with tests/fault."""

from __future__ import annotations

import pytest


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    """Pipeline tests use their own embedded store, never a server from the environment."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
