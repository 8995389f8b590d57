"""What an operator sees in the Prefect UI (issue 17, point 3), on the session's real Prefect test
server: a training stage's progress lines and progress artifact, the gate verdict in the logs, the
summary table and the MLflow link artifact. One tiny DPO run in its own process (real launcher)."""

from __future__ import annotations

import time

import pytest
from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from prefect.runtime import flow_run

from alignment.config import DPOConfig
from tasks.launcher import run_recipe
from tasks.records import StageTiming
from tasks.stages.register import RegistryRecord, log_verdict
from tasks.stages.summary import CELL_CHARS, PipelineSummary, publish_summary
from tests.tiny_models import make_tiny_model, preference_pairs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _logs_and_artifacts(flow_run_id: str) -> tuple[list[str], list]:
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        for _ in range(20):  # the log worker sends in the background
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if any(log.message.startswith("Gate:") for log in logs):
                break
            time.sleep(0.5)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs], artifacts


def test_training_progress_gate_verdict_and_summary_reach_the_prefect_run(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = make_tiny_model(tmp_path / "m", "gpt2")
    preference_pairs(16).to_parquet(tmp_path / "pairs.parquet")
    settings = DPOConfig(model={"name_or_path": str(folder)}, train_path=str(tmp_path / "pairs.parquet"),
                         batch_size=4, max_steps=4, max_length=48, max_prompt_length=16, log_every=1)

    @task
    def train() -> dict:
        return run_recipe("dpo", settings, tmp_path / "run", description="train dpo", progress_every_s=1)

    @flow
    def monitored() -> str:
        train()
        record = RegistryRecord(policy_model="mon-policy", policy_version="1", promoted=False,
                                champion_version=None, previous_champion=None,
                                reasons=["Not promoted: 1 of 6 rules failed (win_rate)."])
        log_verdict(record, get_run_logger())
        summary = PipelineSummary(pipeline="mon", home=str(tmp_path), mlflow_run_id="r1", experiment_id="3",
                                  tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", status="not-promoted")
        publish_summary(summary, [StageTiming(stage="evaluate", status="ran", seconds=12.345, metrics={
            "oracle cand": 0.123456789, "oracle base": 0.0456789, "reward cand": 1.23456, "KL to base": 3.456789,
            "win vs champion (oracle)": 0.55, "malformed": 0.0, "distinct-2": 0.81234567})], time.monotonic())
        return str(flow_run.get_id())

    messages, artifacts = _logs_and_artifacts(monitored())
    progress = [m for m in messages if m.startswith("train dpo: step")]
    assert progress and progress[-1].startswith("train dpo: step 4/4 (100%), loss "), messages
    assert "Gate: mon-policy v1 NOT promoted (champion stays unset: no champion yet)" in messages
    assert "Gate reason: Not promoted: 1 of 6 rules failed (win_rate)." in messages
    assert "Round mon: not-promoted" in " ".join(messages)
    assert any(m.startswith("Stage evaluate: ran in 12.3 s; oracle cand=0.1235, ") for m in messages), messages
    by_key = {a.key: a for a in artifacts}
    bar = by_key["train-dpo-progress"]
    assert bar.type == "progress" and float(bar.data) == 100.0 and "step 4/4" in bar.description
    table = by_key["mon-run-summary"]
    import json

    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert len(rows) > 1 and all(len(r["key figures"]) <= CELL_CHARS for r in rows)
    assert "0.1235" in json.dumps(rows) and "0.123456789" not in json.dumps(rows)
    link = by_key["mon-mlflow-run"]  # an embedded store has no server: instructions, not a dead link
    assert link.type == "markdown" and "mlflow ui --backend-store-uri" in link.data and "r1" in link.data
