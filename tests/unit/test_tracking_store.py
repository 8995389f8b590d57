"""Which MLflow store a pipeline writes to: the user's server when they set one, otherwise
its own home's embedded store, even after another pipeline in the same process configured
MLflow (``mlflow.set_tracking_uri`` exports the URI to the environment)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks import tracking


@pytest.fixture
def no_uri_env(monkeypatch):
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, "-")  # records the value before the test, put back after it
        monkeypatch.delenv(name)
    monkeypatch.setattr(tracking, "_ENV_SET_BY_US", {})


def _db(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


def test_second_home_gets_its_own_store_after_the_first_configured_mlflow(tmp_path, no_uri_env):
    tracking.configure(tmp_path / "a", "exp")
    assert _db(tracking.tracking_uri(tmp_path / "b")) == (tmp_path / "b" / "mlflow.db").resolve()
    tracking.configure(tmp_path / "b", "exp")
    import mlflow

    assert _db(mlflow.get_tracking_uri()) == (tmp_path / "b" / "mlflow.db").resolve()
    assert (tmp_path / "b" / "mlflow.db").exists()


def test_an_earlier_home_put_back_in_the_environment_is_not_taken_for_the_users(tmp_path, no_uri_env):
    # a test's monkeypatch (or a caller's save/restore) can put back a URI an earlier configure exported
    tracking.configure(tmp_path / "a", "exp")
    earlier = os.environ["MLFLOW_TRACKING_URI"]
    tracking.configure(tmp_path / "b", "exp")
    os.environ["MLFLOW_TRACKING_URI"] = earlier
    assert _db(tracking.tracking_uri(tmp_path / "c")) == (tmp_path / "c" / "mlflow.db").resolve()


def test_users_tracking_uri_wins(tmp_path, no_uri_env, monkeypatch):
    user_store = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user_store)
    assert tracking.tracking_uri(tmp_path / "home") == user_store
    tracking.configure(tmp_path / "home", "exp")
    assert tracking.tracking_uri(tmp_path / "other") == user_store
    assert not (tmp_path / "home" / "mlflow.db").exists()
