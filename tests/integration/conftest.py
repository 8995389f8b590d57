"""Integration fixtures: one Prefect test server per session (starting one costs ~17 s), and
one demo base-model cache shared by the pipeline tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect API + SQLite database for the whole session."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """Demo corpus + tiny base model cache, built once per session by the first pipeline run."""
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture
def clean_mlflow_env(monkeypatch):
    """Pipeline tests use their own embedded store, never a server from the environment."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL"):
        monkeypatch.delenv(var, raising=False)
