"""Monitoring where operators look (issue 17, point 3), without a Prefect server: progress lines and
ETA, the summary table's cells, the gate artifact's figures, the MLflow link, the experiment kind,
dataset inputs (real MLflow SQLite store) and the frontier plot's axis."""

from __future__ import annotations

import logging

import pytest
from mlflow import MlflowClient

from tasks import tracking
from tasks.evaluation.plots import SCORE_AXES
from tasks.progress import TrainingProgress, artifact_key, duration
from tasks.records import StageTiming
from tasks.stages.register import RegistryRecord, decision_markdown, log_verdict
from tasks.stages.summary import CELL_CHARS, PipelineSummary, figure_lines, run_link, table_rows


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _train(step, loss, total=100, **more):
    return {"step": step, "total_steps": total, "phase": "train", "time": 0.0, "loss": loss, "grad_norm": 1.0, **more}


def test_progress_is_rate_limited_and_carries_step_loss_metrics_and_eta(caplog):
    clock = _Clock()
    progress = TrainingProgress("train dpo", every_s=60, clock=clock)
    assert progress.tick() is None  # nothing seen yet
    progress.observe(_train(10, 0.6931471805599453, **{"rewards/accuracy": 0.5}))
    with caplog.at_level(logging.INFO, logger="tasks.progress"):
        first = progress.tick()
    assert first == "train dpo: step 10/100 (10%), loss 0.6931, rewards/accuracy 0.5"  # no ETA from one point
    assert any(r.getMessage() == first for r in caplog.records)
    clock.now = 30
    progress.observe(_train(20, 0.5))
    assert progress.tick() is None  # 30 s since the last line: not yet
    clock.now = 61
    progress.observe(_train(30, 0.41234567))
    line = progress.tick()
    # 20 steps in 61 s since step 10 was first seen: 70 steps left ≈ 213.5 s
    assert line.startswith("train dpo: step 30/100 (30%), loss 0.4123") and line.endswith("ETA 3m34s"), line
    assert "grad_norm" not in line  # key metrics only
    clock.now = 200
    assert progress.tick() is None  # no new step, no repeated line
    progress.observe({"step": 30, "total_steps": 100, "phase": "eval", "eval/loss": 0.45678912, "time": 1.0})
    assert progress.tick() is None and progress.lines[-1] == "train dpo: evaluation at step 30: eval/loss 0.4568"
    progress.observe(_train(100, 0.3))
    assert progress.finish() == "train dpo: step 100/100 (100%), loss 0.3"  # forced, no ETA at the end
    quiet = TrainingProgress("x", every_s=None, clock=clock)
    quiet.observe(_train(1, 0.1))
    assert quiet.tick() is None and quiet.finish() is None and quiet.lines == []


def test_progress_helpers():
    assert duration(42) == "42s" and duration(185) == "3m05s" and duration(7620) == "2h07m"
    assert artifact_key("train dpo") == "train-dpo-progress" and artifact_key("Train__SFT!") == "train-sft-progress"


def test_summary_table_cells_fit_and_floats_are_rounded():
    rows = [StageTiming(stage="base model (demo)", status="ready", seconds=1.23456,
                        metrics={"path": "/home/someone/.cache/alignflow/demo/models/base-model-4c1f0e2a9b8d/final"}),
            StageTiming(stage="build preferences", status="ran", seconds=2.0,
                        metrics={"pairs": 120, "digest": "ab" * 32}),
            StageTiming(stage="evaluate", status="ran", seconds=30.0,
                        metrics={"oracle cand": 0.123456789, "oracle base": 0.0456789, "reward cand": 1.23456,
                                 "KL to base": 3.456789, "win vs champion (RM)": 0.5, "win vs champion (oracle)": 0.55,
                                 "malformed": 0.0, "distinct-2": 0.81234567})]
    table = table_rows(rows)
    assert all(len(r["key figures"]) <= CELL_CHARS for r in table), table
    assert [r["stage"] for r in table if r["stage"]] == ["base model (demo)", "build preferences", "evaluate"]
    assert table[0]["seconds"] == 1.2
    text = " ".join(r["key figures"] for r in table)
    assert "0.1235" in text and "0.123456" not in text and "3.457" in text
    assert "digest=abababababab…" in text  # a digest by its head
    path = "".join(r["key figures"] for r in table[:2] if r["stage"] in ("", "base model (demo)"))
    assert "base-model-4c1f0e2a9b8d/final" in path  # a long path continues on the next row, not cut off
    assert figure_lines({}) == [""]


def test_gate_artifact_rounds_figures_and_never_says_vnone():
    record = RegistryRecord(policy_model="demo-policy", policy_version="2", promoted=False, champion_version="1",
                            previous_champion=None, reasons=["Not promoted: 1 of 6 rules failed (win_rate)."])
    decision = {"checks": [{"rule": "win_rate", "value": 0.41234567891, "threshold": 0.5, "passed": False},
                           {"rule": "kl_budget", "value": None, "threshold": None, "passed": True}]}
    md = decision_markdown(record, decision)
    assert "| win_rate | 0.4123 | 0.5 | no |" in md and "0.41234567891" not in md
    assert "| kl_budget | – | – | yes |" in md
    assert "vNone" not in md and "NOT promoted (champion stays v1)" in md


def test_gate_verdict_and_reasons_go_to_the_log(caplog):
    record = RegistryRecord(policy_model="demo-policy", policy_version="3", promoted=True, champion_version="3",
                            previous_champion="2", reasons=["Promoted: all 6 rules pass.", "Win rate 0.61 ..."])
    logger = logging.getLogger("gate-test")
    with caplog.at_level(logging.INFO, logger="gate-test"):
        log_verdict(record, logger)
    assert [r.getMessage() for r in caplog.records] == [
        "Gate: demo-policy v3 PROMOTED to champion", "Gate reason: Promoted: all 6 rules pass.",
        "Gate reason: Win rate 0.61 ..."]


def _summary(uri: str) -> PipelineSummary:
    return PipelineSummary(pipeline="p", home="/tmp/h", mlflow_run_id="r1", experiment_id="7", tracking_uri=uri)


def test_mlflow_link_is_the_configured_server_not_a_fixed_port():
    assert run_link(_summary("https://bob:s3cret@mlflow.corp:8443/base/")) == \
        "https://bob:***@mlflow.corp:8443/base/#/experiments/7/runs/r1"
    assert run_link(_summary("http://10.0.0.5:9999")) == "http://10.0.0.5:9999/#/experiments/7/runs/r1"
    assert run_link(_summary("sqlite:////tmp/h/mlflow.db")) is None  # no server: no guessed address


@pytest.fixture
def store(tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    experiment_id = tracking.configure(tmp_path / "home", "monitoring")
    return experiment_id


def test_experiment_opens_on_training_runs_and_a_users_choice_stays(store):
    client = MlflowClient()
    assert client.get_experiment(store).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(store, "mlflow.experimentKind", "genai_development")
    tracking.mark_training_experiment(store)
    assert client.get_experiment(store).tags["mlflow.experimentKind"] == "genai_development"


def test_dataset_inputs_are_logged_and_the_run_stays_running(store, tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    # several row groups: the lineage record reads the first rows and the footer, not the data
    path = tmp_path / "pairs-train.parquet"
    n = 5000
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(n)], "chosen": ["x"] * n, "rejected": ["z"] * n,
                             "weight": [1.0] * n}), path, row_group_size=500)
    parent = tracking.start_parent_run(store, "round", {})
    with tracking.child_run(parent, "train") as run_id:
        tracking.log_dataset(run_id, path, name="p-pairs-train", context="training", digest="d" * 36)
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "RUNNING"  # logging an input does not end the stage's run
        [entry] = run.inputs.dataset_inputs
        assert entry.dataset.name == "p-pairs-train" and entry.dataset.digest == "d" * 36
        tags = {t.key: t.value for t in entry.tags}
        assert tags["mlflow.data.context"] == "training" and tags["alignflow.num_rows"] == "5000"
        columns = [c["name"] for c in json.loads(entry.dataset.schema)["mlflow_colspec"]]
        assert columns == ["prompt", "chosen", "rejected", "weight"]
        assert str(path) in entry.dataset.source
    tracking.log_metrics(parent, {"eval/candidate/kl": 1.5})
    assert MlflowClient().get_run(parent).data.metrics == {"eval/candidate/kl": 1.5}


def test_frontier_plot_names_the_oracle_not_reward():
    ylabel, title = SCORE_AXES["oracle_mean"]
    assert "oracle" in ylabel and "reward" not in ylabel.lower() and "reward" not in title.lower()
    assert "reward" in SCORE_AXES["reward_mean"][0]
