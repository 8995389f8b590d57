"""The run tree of a pipeline: parent and child runs, params, metrics, tags, artifacts,
tables, dataset lineage, and live metric streaming from a recipe's ``metrics.jsonl``.

One parent run per flow run (left open until :func:`end_run`, which the flow calls in one
place); one child run per stage that actually runs (cached stages add no run).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from tasks.redact import redact_text


def start_parent_run(experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """Create the flow run's parent MLflow run (left open until :func:`end_run`)."""
    run = MlflowClient().create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run with FINISHED, FAILED or KILLED."""
    MlflowClient().set_terminated(run_id, status=status)


HOME_TAG = "alignflow.home"
"""Tag of a parent run: the pipeline home it ran on (which runs :func:`close_stale_runs` may close)."""


def close_stale_runs(experiment_id: str, home: str, keep: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """Close as FAILED every RUNNING run of a dead round on ``home``: parents tagged
    ``alignflow.home = home`` and their child runs, except the runs in ``keep``.

    Assumes the caller holds the home's lock (tasks/lock.py): no live process of this home can
    own a RUNNING run, so each one belongs to a process that died (killed, OOM, power loss).
    Returns the closed parents as ``{"run_id", "flow_run_id"}`` (the Prefect flow run to close too).
    """
    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    homes: dict[str, str | None] = {}

    def home_of(run_id: str) -> str | None:
        if run_id not in homes:
            try:
                homes[run_id] = client.get_run(run_id).data.tags.get(HOME_TAG)
            except MlflowException:
                homes[run_id] = None
        return homes[run_id]

    closed = []
    for run in running:
        run_id, tags = run.info.run_id, run.data.tags
        if run_id in keep:
            continue
        parent = tags.get("mlflow.parentRunId")
        if (tags.get(HOME_TAG) if parent is None else home_of(parent)) != home:
            continue
        client.set_tag(run_id, "alignflow.closed_by", "a later run on this home: the process running it died")
        client.set_terminated(run_id, status="FAILED")
        if parent is None:
            closed.append({"run_id": run_id, "flow_run_id": tags.get("prefect.flow_run_id", "")})
    return closed


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


@contextmanager
def stage_run(parent_run_id: str | None, stage: str, tags: dict[str, str] | None = None) -> Iterator[str | None]:
    """:func:`child_run` under ``parent_run_id``, or no run (yields None) when it is None
    (a stage used without tracking, e.g. from a benchmark)."""
    if parent_run_id is None:
        yield None
        return
    with child_run(parent_run_id, stage, tags) as run_id:
        yield run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Log flat params (values stringified, URL credentials masked, cut to MLflow's 6000-char limit)."""
    from mlflow.entities import Param

    items = [Param(str(k)[:250], redact_text(str(v))[:6000]) for k, v in params.items()]
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


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    """Set several tags on a run (values stringified, URL credentials masked: error texts may hold URLs)."""
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, redact_text(str(value)))


def log_table(run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
    """Log a table artifact (shown as a table in the MLflow UI)."""
    MlflowClient().log_table(run_id, frame, artifact_file)


def log_dataset(run_id: str, path: str | Path, name: str, context: str, digest: str | None = None) -> None:
    """Record a table file (Parquet, or a validated Arrow file) as a dataset input of a run
    (``mlflow.data`` lineage: the run page's "Datasets"): its columns, from the first rows only,
    its row count (input tag ``alignflow.num_rows``, from the file's footer) and ``digest`` as its
    version (None: MLflow's digest of name, source and columns). Nothing else of the file is read,
    so a large dataset costs the flow process no memory. Logged through the client, so the run
    stays RUNNING and no active run is left in this thread."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from tasks.data.handoff import head_frame, validated_rows

    head = head_frame(path)
    columns = mlflow.data.from_pandas(head, source=redact_text(str(path)), name=name)
    dataset = MetaDataset(columns.source, name=name, digest=digest, schema=columns.schema)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("alignflow.num_rows", str(validated_rows(path)))]
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)])


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's experiment type tag: the UI opens a ``genai_development`` experiment (or one it cannot
classify) on the GenAI traces overview, a ``custom_model_development`` one on its training runs."""


def mark_training_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training (``custom_model_development``) unless a user chose a
    kind. Only the UI's first page depends on it: a server that refuses the tag (an experiment
    another user owns) is logged, not fatal."""
    client = MlflowClient()
    try:
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    except MlflowException as err:
        logging.getLogger(__name__).warning("experiment %s: %s not set (%s)", experiment_id, EXPERIMENT_KIND_TAG, err)


def recent_runs(experiment: str, tag: str, max_results: int = 10) -> list[Any] | None:
    """The newest runs of an experiment that carry ``tag`` (a non-empty value), newest first.

    Returns None when the experiment does not exist yet."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    return client.search_runs([found.experiment_id], filter_string=f"tags.`{tag}` != ''",
                              order_by=["attributes.start_time DESC"], max_results=max_results)
