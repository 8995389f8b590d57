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


def test_a_copied_home_is_refused_naming_both_homes(tmp_path, no_uri_env):
    import shutil

    tracking.configure(tmp_path / "a", "exp")  # the experiment's artifacts: <a>/mlartifacts/exp
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with pytest.raises(tracking.HomeMovedError, match="moved or copied") as err:
        tracking.check_home(tmp_path / "b", "exp")
    assert str((tmp_path / "b").resolve()) in str(err.value) and str((tmp_path / "a").resolve()) in str(err.value)
    with pytest.raises(tracking.HomeMovedError):  # every command's configure refuses it too
        tracking.configure(tmp_path / "b", "exp")
    tracking.check_home(tmp_path / "a", "exp")  # the original is fine
    tracking.check_home(tmp_path / "new", "exp")  # no store yet: nothing to check


def test_a_moved_home_is_refused_even_through_a_link_from_its_old_path(tmp_path, no_uri_env):
    tracking.configure(tmp_path / "a", "exp")
    (tmp_path / "a").rename(tmp_path / "moved")
    with pytest.raises(tracking.HomeMovedError, match="Move it back"):
        tracking.check_home(tmp_path / "moved", "exp")
    # a link makes the old paths resolve, but the ledger knows its files by their old names
    (tmp_path / "a").symlink_to(tmp_path / "moved")
    with pytest.raises(tracking.HomeMovedError):
        tracking.check_home(tmp_path / "moved", "exp")
    (tmp_path / "a").unlink()
    (tmp_path / "moved").rename(tmp_path / "a")  # moved back: fine again
    tracking.check_home(tmp_path / "a", "exp")


def test_a_users_own_store_is_not_checked(tmp_path, no_uri_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'server.db'}")
    tracking.configure(tmp_path / "a", "exp")  # the experiment's artifacts under <a>, in the user's store
    tracking.configure(tmp_path / "b", "exp")  # another home on the same store: the user's arrangement
    tracking.check_home(tmp_path / "b", "exp")
