"""MLflow for the pipeline: the only package that talks to MLflow.

* this module: where runs go (the tracking store, :func:`configure`);
* :mod:`tasks.tracking.runs`: the run tree (one parent run per flow run, tagged with the
  Prefect flow-run id; one child run per stage that actually runs, cached stages add none),
  params, metrics, tags, artifacts, tables, dataset lineage, live metric streaming;
* :mod:`tasks.tracking.registry`: registered models, their versions, tags and aliases.

Every name of both is re-exported here, so callers write ``from tasks import tracking`` and
``tracking.child_run(...)``, ``tracking.promote(...)``.

Embedded default: ``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts``;
``MLFLOW_TRACKING_URI`` (a tracking server) wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from alignment.config import ConfigError
from tasks.redact import split_credentials

TrackingError = MlflowException
"""What a failed store or registry call raises (callers outside this package catch this name)."""


class HomeMovedError(ConfigError):
    """The home's embedded store keeps its artifacts in another home: it was moved or copied."""


_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_ENV_SET_BY_US: dict[str, set[str]] = {}
"""Every value :func:`configure` put in ``os.environ`` in this process (``mlflow.set_tracking_uri``
exports the URI so subprocesses inherit it). None is the user's choice, so none may make a later
pipeline with another home write into an earlier one's embedded store, even after something
(a test's monkeypatch, a caller's own save/restore) puts an older one of them back."""


def _user_env(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value in _ENV_SET_BY_US.get(name, set()) else value


def tracking_uri(home: Path) -> str:
    """``MLFLOW_TRACKING_URI`` when the user set it, else the embedded SQLite store under ``home``."""
    return _user_env("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(home).resolve()}/mlflow.db"


def _create_sqlite_store_once(uri: str) -> None:
    """Create the SQLite store's schema under an exclusive file lock (``<db>.lock``).

    MLflow's schema creation is not safe when several processes create the same new SQLite
    file at once: the losers fail, and leftover ``_alembic_tmp_*`` tables can leave the store
    unusable for every later run (seen with three simultaneous first runs). Under the lock the
    first process creates the schema and the others find it ready. No-op where ``fcntl`` is missing.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: single-user embedded use only
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)


def _artifacts_folder(home: Path, experiment: str) -> Path:
    return (Path(home) / "mlartifacts" / experiment).resolve()


def _check_artifacts_in_home(location: str | None, home: Path, experiment: str) -> None:
    """Raise :class:`HomeMovedError` when an embedded store's experiment keeps its artifacts outside
    ``home`` (a ``file:`` location other than ``<home>/mlartifacts/<experiment>`` under the home's
    resolved path).

    MLflow stores every artifact location as an absolute path, and a home's records, ledger and
    caches name its files absolutely too, so a home that was moved or copied would read the old
    home's models, or write into it, without a word. The paths are compared as written (both were
    resolved when written): a symbolic link from the old path to the new one does not pass, because
    the ledger knows its files by their old names and would take every landed batch for a new one.
    Locations that are not local files (a tracking server's) are not checked.
    """
    if not location or not location.startswith("file:"):
        return
    stored = Path(unquote(urlparse(location).path))
    if stored == _artifacts_folder(home, experiment):
        return
    here = Path(home).resolve()
    old = stored.parent.parent if stored.parent.name == "mlartifacts" else stored
    raise HomeMovedError(
        f"pipeline.home: {here} was moved or copied from {old}: its MLflow store keeps the artifacts of "
        f"experiment {experiment!r} at {stored}, and its records and caches name files under {old}, so a round "
        f"here would read (or write) that home's files. Move it back to {old}, or start a new home here "
        f"(pipeline.home, ALIGNFLOW_HOME); homes are not relocatable")


def check_home(home: Path, experiment: str) -> None:
    """Before a command uses ``home``'s embedded store: raise :class:`HomeMovedError` when the home
    was moved or copied (:func:`_check_artifacts_in_home`). No-op with the user's own store
    (``MLFLOW_TRACKING_URI``), or before the store or the experiment exists (a new home)."""
    if _user_env("MLFLOW_TRACKING_URI") is not None or not (Path(home) / "mlflow.db").is_file():
        return
    uri = tracking_uri(home)
    found = MlflowClient(tracking_uri=uri, registry_uri=uri).get_experiment_by_name(experiment)
    if found is not None:
        _check_artifacts_in_home(found.artifact_location, home, experiment)


def configure(home: Path, experiment: str) -> str:
    """Point MLflow at the pipeline's store and make sure its experiment exists. Returns its id.

    With the embedded store, artifacts go to ``<home>/mlartifacts/<experiment>``; with a
    server, the server decides (``--serve-artifacts``). A new SQLite store is created under a
    file lock, so runs that start at the same moment do not race in its schema creation. Raises
    :class:`HomeMovedError` when the embedded store's experiment keeps its artifacts in another
    home (the home was moved or copied).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(home)
    if uri.startswith("sqlite:///"):
        _create_sqlite_store_once(uri)
    user = {name: _user_env(name) for name in _URI_VARS}
    registry = user["MLFLOW_REGISTRY_URI"] or uri
    # user:password in a server URL goes to MLflow's basic-auth variables, so MLflow never has it in
    # a URL it prints ("View run ... at") or puts in error messages; subprocesses inherit both.
    uri, user_name, password = split_credentials(uri)
    registry = split_credentials(registry)[0]
    if password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user_name or "")
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    for name in _URI_VARS:
        if user[name] is None and name in os.environ:
            _ENV_SET_BY_US.setdefault(name, set()).add(os.environ[name])
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if user["MLFLOW_TRACKING_URI"] is None:  # the home's embedded store
            _check_artifacts_in_home(found.artifact_location, home, experiment)
        experiment_id = found.experiment_id
    else:
        location = None
        if uri.startswith("sqlite:"):
            location = _artifacts_folder(home, experiment).as_uri()
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # created concurrently by another run
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    mark_training_experiment(experiment_id)  # the UI opens it on training runs, not the GenAI overview
    return experiment_id


from tasks.tracking.registry import (  # noqa: E402  (re-exported: the package's public names)
    CHALLENGER,
    CHAMPION,
    PROMOTED_AT,
    ROLLED_BACK_AT,
    alias_version,
    champion_history,
    download_model,
    find_version,
    log_policy,
    log_reward_model,
    model_version,
    model_versions,
    policy_model_name,
    promote,
    reward_model_name,
    rollback,
    set_alias,
    set_version_description,
    set_version_tags,
    version_tags,
)
from tasks.tracking.runs import (  # noqa: E402
    HOME_TAG,
    MetricStreamer,
    child_run,
    close_stale_runs,
    end_run,
    flatten,
    log_artifact,
    log_dataset,
    log_metrics,
    log_params,
    log_table,
    mark_training_experiment,
    recent_runs,
    set_tags,
    stage_run,
    start_parent_run,
)

__all__ = [
    "TrackingError", "HomeMovedError", "check_home", "CHALLENGER", "CHAMPION", "PROMOTED_AT", "ROLLED_BACK_AT", "MetricStreamer", "alias_version",
    "champion_history", "child_run", "close_stale_runs", "HOME_TAG", "configure", "download_model", "end_run", "find_version", "flatten",
    "log_artifact", "log_dataset", "log_metrics", "log_params", "log_policy", "log_reward_model",
    "log_table", "mark_training_experiment", "model_version", "model_versions", "policy_model_name", "promote", "recent_runs", "reward_model_name",
    "rollback", "set_alias", "set_tags", "set_version_description", "set_version_tags", "stage_run", "start_parent_run", "tracking_uri",
    "version_tags",
]
