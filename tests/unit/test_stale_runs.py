"""Runs of a dead round are closed by the next run on the same home (issue 14, point 1)."""

from __future__ import annotations

from mlflow import MlflowClient

from tasks import tracking


def test_running_runs_of_this_home_are_closed_and_others_left_alone(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    experiment = tracking.configure(tmp_path, "p")
    here, elsewhere = str(tmp_path), "/some/other/home"
    dead = tracking.start_parent_run(experiment, "dead", {tracking.HOME_TAG: here, "prefect.flow_run_id": "f-dead"})
    with_child = MlflowClient().create_run(experiment, run_name="train", tags={"mlflow.parentRunId": dead}).info.run_id
    other = tracking.start_parent_run(experiment, "other home", {tracking.HOME_TAG: elsewhere})
    done = tracking.start_parent_run(experiment, "done", {tracking.HOME_TAG: here})
    tracking.end_run(done)
    live = tracking.start_parent_run(experiment, "this run", {tracking.HOME_TAG: here})
    closed = tracking.close_stale_runs(experiment, here, keep=frozenset({live}))
    assert closed == [{"run_id": dead, "flow_run_id": "f-dead"}]
    status = {r: MlflowClient().get_run(r).info.status for r in (dead, with_child, other, done, live)}
    assert status == {dead: "FAILED", with_child: "FAILED", other: "RUNNING", done: "FINISHED", live: "RUNNING"}
    assert MlflowClient().get_run(dead).data.tags["alignflow.closed_by"].startswith("a later run")
