"""MLflow for the pipeline: where runs go, the run tree, metric streaming, model logging and
the registry's aliases.

Embedded default: ``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts``;
``MLFLOW_TRACKING_URI`` (a tracking server) wins. One parent run per flow run, tagged with
the Prefect flow-run id; one child run per stage that actually runs (cached stages add no run).

Registry: ``<pipeline>-policy`` and ``<pipeline>-reward``. Alias ``champion`` is what
production serves, ``challenger`` the last candidate. Promotion history lives in version tags
(``alignflow.promoted_at``, ``alignflow.rolled_back_at``), one write per version, so two
pipelines promoting at once cannot lose each other's history.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from tasks.serving import POLICY_MODEL_FILE, REWARD_MODEL_FILE

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTED_AT = "alignflow.promoted_at"
ROLLED_BACK_AT = "alignflow.rolled_back_at"


_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_ENV_SET_BY_US: dict[str, str] = {}
"""Values :func:`configure` put in ``os.environ`` (``mlflow.set_tracking_uri`` exports the
URI so subprocesses inherit it). They are not the user's choice and must not make a later
pipeline with another home write into this one's embedded store."""


def _user_env(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value == _ENV_SET_BY_US.get(name) else value


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


def configure(home: Path, experiment: str) -> str:
    """Point MLflow at the pipeline's store and make sure its experiment exists. Returns its id.

    With the embedded store, artifacts go to ``<home>/mlartifacts/<experiment>``; with a
    server, the server decides (``--serve-artifacts``). A new SQLite store is created under a
    file lock, so runs that start at the same moment do not race in its schema creation.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(home)
    if uri.startswith("sqlite:///"):
        _create_sqlite_store_once(uri)
    user = {name: _user_env(name) for name in _URI_VARS}
    registry = user["MLFLOW_REGISTRY_URI"] or uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    for name in _URI_VARS:
        if user[name] is None and name in os.environ:
            _ENV_SET_BY_US[name] = os.environ[name]
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        location = (home / "mlartifacts" / experiment).resolve().as_uri()
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except MlflowException:  # created concurrently by another run
        return client.get_experiment_by_name(experiment).experiment_id


def start_parent_run(experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """Create the flow run's parent MLflow run (left open until :func:`end_run`)."""
    run = MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run with FINISHED, FAILED or KILLED."""
    MlflowClient().set_terminated(run_id, status=status)


@contextmanager
def child_run(parent_run_id: str, stage: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A stage's child run under ``parent_run_id``; FAILED if the body raises."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    all_tags = {"mlflow.parentRunId": parent_run_id, "alignflow.stage": stage, **(tags or {})}
    run = client.create_run(parent.info.experiment_id, run_name=stage, tags=all_tags)
    run_id = run.info.run_id
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log flat params (values stringified and cut to MLflow's 6000-char limit)."""
    from mlflow.entities import Param

    items = [Param(str(k)[:250], str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient()
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b.c": value}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log finite numeric metrics at one step (others are skipped: MLflow rejects NaN keys badly)."""
    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")
    ]
    client = MlflowClient()
    for start in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[start : start + 500])


def log_artifact(run_id: str, path: Path | str, artifact_path: str | None = None) -> None:
    """Upload a file or folder to a run's artifacts."""
    client = MlflowClient()
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


class MetricStreamer:
    """Tails a recipe's ``metrics.jsonl`` and logs each new line to an MLflow run while the
    training process runs, so curves appear live. Train metrics keep their names; eval lines
    are already prefixed ``eval/`` by the recipe. Call :meth:`stop` to flush the rest."""

    def __init__(self, path: Path, run_id: str | None, interval_s: float = 2.0, on_line: Any = None):
        self.path, self.run_id, self.interval_s, self.on_line = Path(path), run_id, interval_s, on_line
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.lines_logged = 0
        self.last: dict[str, Any] = {}

    def start(self) -> MetricStreamer:
        self._thread.start()
        return self

    def _read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open() as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        complete, _, _partial = chunk.rpartition("\n")
        if not complete and not chunk.endswith("\n"):
            return []
        self._offset += len(complete) + 1
        records = []
        for line in complete.splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def _flush(self) -> None:
        records = self._read_new()
        if not records:
            return
        now = int(time.time() * 1000)
        batch = []
        for rec in records:
            step = int(rec.get("step", 0))
            for key, value in rec.items():
                if key in ("step", "total_steps", "time", "phase", "epoch") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
                    batch.append(Metric(key, float(value), now, step))
            self.last.update(rec)
            if self.on_line is not None:
                self.on_line(rec)
        if self.run_id is not None:  # without a run the streamer only drives the progress callback
            client = MlflowClient()
            for start in range(0, len(batch), 500):
                client.log_batch(self.run_id, metrics=batch[start : start + 500])
        self.lines_logged += len(records)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._flush()
            except (OSError, MlflowException):
                continue  # a transient store error must not kill training; the final flush retries

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._flush()


# ----------------------------------------------------------------------------- models


def _log_pyfunc(run_id: str, code_file: Path, model_dir: Path, name: str, registered_name: str,
                tags: dict[str, str]) -> str:
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
        )
    version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    return str(version.version)


def log_policy(run_id: str, model_dir: Path, pipeline: str, tags: dict[str, str]) -> str:
    """Log the policy folder as a text-generation pyfunc; register a new ``<pipeline>-policy`` version."""
    return _log_pyfunc(run_id, POLICY_MODEL_FILE, model_dir, "policy", f"{pipeline}-policy", tags)


def log_reward_model(run_id: str, model_dir: Path, pipeline: str, tags: dict[str, str]) -> str:
    """Log the reward model as a scoring pyfunc; register a new ``<pipeline>-reward`` version."""
    return _log_pyfunc(run_id, REWARD_MODEL_FILE, model_dir, "reward_model", f"{pipeline}-reward", tags)


# ----------------------------------------------------------------------------- registry


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, or None (no model, or alias unset)."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


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
    client.set_model_version_tag(name, version, PROMOTED_AT, f"{time.time():.6f}")
    if reason:
        client.set_model_version_tag(name, version, "alignflow.promotion_reason", reason)
    if ROLLED_BACK_AT in version_tags(name, version):  # promoted again after a rollback
        client.delete_model_version_tag(name, version, ROLLED_BACK_AT)
    _write_alias(client, name, CHAMPION, version)


def champion_history(name: str) -> list[str]:
    """Versions ever promoted and not rolled back, oldest promotion first."""
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    live = [v for v in versions if PROMOTED_AT in v.tags and ROLLED_BACK_AT not in v.tags]
    return [str(v.version) for v in sorted(live, key=lambda v: float(v.tags[PROMOTED_AT]))]


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
    client.set_model_version_tag(name, current, ROLLED_BACK_AT, f"{time.time():.6f}")
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
