"""A small stand-in for ``flows.pipeline.alignment_pipeline`` with the same parameters, used
to exercise the deployment harness (worker, MLflow server, registry) in seconds.

It does what the real pipeline does to the tracking server, in miniature: a parent run tagged
with the Prefect flow-run id, a child run with a metric and an artifact (uploaded through the
server's artifact proxy), a new version of ``<pipeline>-policy`` and a guarded ``champion``
move. Everything comes from the environment (MLFLOW_TRACKING_URI and credentials), as in
production. Imports nothing from the project, so a worker can load it from any checkout.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import flow, runtime
from prefect.concurrency.sync import concurrency

PIPELINE = "standin"


def _ensure_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name)
    except MlflowException as err:  # a concurrent run created it first
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


@flow(name="standin-pipeline")
def standin_pipeline(config: str | None = None, overrides: list[str] | None = None,
                     only_if_new_data: bool = False) -> dict:
    """Log a run tree, register a version and move ``champion`` to the newest version."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(PIPELINE)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(PIPELINE)
        except MlflowException:
            experiment_id = client.get_experiment_by_name(PIPELINE).experiment_id
    else:
        experiment_id = experiment.experiment_id
    flow_run_id = str(runtime.flow_run.id)
    parent = client.create_run(experiment_id, run_name="pipeline",
                               tags={"prefect.flow_run_id": flow_run_id})
    child = client.create_run(experiment_id, run_name="train",
                              tags={"mlflow.parentRunId": parent.info.run_id})
    for step in range(3):
        client.log_metric(child.info.run_id, "loss", 1.0 / (step + 1), step=step)
    with tempfile.TemporaryDirectory() as tmp:
        card = Path(tmp) / "model.json"
        card.write_text(json.dumps({"config": config, "overrides": overrides or []}))
        client.log_artifact(child.info.run_id, str(card), "model")
    name = f"{PIPELINE}-policy"
    _ensure_model(client, name)
    source = f"{client.get_run(child.info.run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source, run_id=child.info.run_id,
                                          tags={"prefect.flow_run_id": flow_run_id}).version
    # Read-compare-write of the alias under the server-wide `registry` lock (infra/bootstrap_prefect.py):
    # without it two runs can both read the old champion and the slower one wins (seen here).
    with concurrency("registry", occupy=1, timeout_seconds=120):
        try:
            current = int(client.get_model_version_by_alias(name, "champion").version)
        except MlflowException:
            current = 0
        if int(version) > current:
            client.set_registered_model_alias(name, "champion", version)
    client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)
    return {"parent_run_id": parent.info.run_id, "version": str(version)}
