"""The whole pipeline on tiny settings under the real Prefect engine (test harness) with a real
embedded MLflow store: run tree, metrics, artifacts, registry, aliases, serving, the gate,
rollback, caching, the scheduled no-op and the drift-triggered retraining."""

from __future__ import annotations

import json
import time

import mlflow
import pandas as pd
import pytest
from prefect.settings import get_current_settings

from flows.cli import main as cli_main
from flows.pipeline import alignment_pipeline
from tasks import tracking
from tasks.config import load_pipeline_config
from tasks.results import SERIALIZER_TYPE, pickles_under
from tasks.round import RoundLog
from tasks.stages.data import data_dir, run_build, run_ingest
from tasks.stages.demo import demo_base_model, simulate_round
from tasks.stages.models import champion_record, champion_reward_record
from tests.integration.pipeline_helpers import TINY, child_runs, overrides, use_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def first_round(prefect_harness, demo_cache, tmp_path_factory):
    """One completed round in its own home (shared by the read-only checks below)."""
    home = tmp_path_factory.mktemp("pipeline-home")
    summary = alignment_pipeline(config=TINY, overrides=overrides(home, demo_cache))
    return home, summary


def test_round_builds_the_run_tree_with_metrics_and_artifacts(first_round, clean_mlflow_env):
    home, summary = first_round
    assert summary["status"] == "promoted"
    client = use_store(home)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] == summary["flow_run_id"] != ""
    assert parent.data.params["dpo.beta"] == "0.1"
    assert parent.data.tags["alignflow.config_digest"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "config")]
    children = child_runs(client, parent.info.run_id)
    assert {"ingest", "preferences", "reward", "dpo", "evaluate", "register"} <= set(children)
    ingest = children["ingest"][0]
    assert ingest.data.metrics["ingest/rows_in"] == (ingest.data.metrics["ingest/rows_valid"]
                                                     + ingest.data.metrics["ingest/rows_quarantined"])
    assert ingest.data.metrics["ingest/rows_quarantined"] > 0  # the simulator corrupts ~2% of rows
    dpo = children["dpo"][0]
    assert len(client.get_metric_history(dpo.info.run_id, "loss")) >= 1
    assert "grad_norm" in dpo.data.metrics and "rewards/margin" in dpo.data.metrics
    prefs = children["preferences"][0]
    assert prefs.data.metrics["data/pairs"] > 0
    assert prefs.inputs.dataset_inputs, "dataset lineage is logged with mlflow.data"
    reward = children["reward"][0].data.metrics  # issue 15: the judge's record on held-out pairs
    assert 0 <= reward["judge/accuracy_lower"] <= reward["judge/accuracy"] <= reward["judge/accuracy_upper"] <= 1
    assert 0 <= reward["judge/ece"] <= 1 and reward["judge/pairs"] > 0
    evaluate = children["evaluate"][0]
    assert "eval/candidate/kl" in evaluate.data.metrics
    plots = [a.path for a in client.list_artifacts(evaluate.info.run_id, "evaluation/plots")]
    assert any(p.endswith("score_distributions.png") for p in plots)
    assert [a.path for a in client.list_artifacts(evaluate.info.run_id, "evaluation")]
    # a finished stage keeps its model and summary, not its resume checkpoints (rounds would pile them up)
    run_dirs = sorted((home / "runs" / "tiny").glob("*-*/summary.json"))
    assert {p.parent.name.split("-")[0] for p in run_dirs} >= {"reward", "dpo"}
    for summary_path in run_dirs:
        assert (summary_path.parent / "final" / "config.json").is_file()
        assert not (summary_path.parent / "checkpoints").exists(), summary_path.parent


def test_round_registers_versions_with_lineage_and_serves_the_champion(first_round, clean_mlflow_env):
    home, summary = first_round
    client = use_store(home)
    assert tracking.alias_version("tiny-policy", "champion") == "1"
    assert tracking.alias_version("tiny-policy", "challenger") == "1"
    assert tracking.alias_version("tiny-reward", "champion") == "1"
    tags = client.get_model_version("tiny-policy", "1").tags
    for key in ("alignflow.data_digest", "alignflow.config_digest", "alignflow.code_version",
                "alignflow.parent_version", "alignflow.gate"):
        assert tags[key], key
    assert tags["alignflow.gate"] == "passed" and tags["alignflow.parent_version"] == "base"
    judge = client.get_model_version("tiny-reward", "1").tags  # issue 15: the judge's record
    for split in ("validation", "test"):
        low, high = map(float, judge[f"alignflow.judge.{split}.accuracy_ci"].split("-"))
        assert low <= float(judge[f"alignflow.judge.{split}.accuracy"]) <= high
        assert 0 <= float(judge[f"alignflow.judge.{split}.ece"]) <= 1 and int(judge[f"alignflow.judge.{split}.pairs"]) > 0
    model = mlflow.pyfunc.load_model("models:/tiny-policy@champion")
    out = model.predict(["This movie", "The plot"], params={"max_new_tokens": 6})
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    generator = model.unwrap_python_model()
    enc = generator.tokenizer("This movie", return_tensors="pt")
    ids = generator.model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert ids.shape[1] == enc["input_ids"].shape[1] + 6
    reward = mlflow.pyfunc.load_model("models:/tiny-reward@champion")
    scores = reward.predict(pd.DataFrame({"prompt": ["This movie"] * 2, "response": [" is great", " is bad"]}))
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


def test_round_is_visible_where_operators_look(first_round, clean_mlflow_env):
    """Issue 17 (3): the MLflow experiment opens on training runs, the parent run carries the headline
    metrics and the dataset, each stage run its inputs; the Prefect run holds training progress, the
    gate verdict and a progress artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters
    from prefect.logging.handlers import APILogHandler

    home, summary = first_round
    client = use_store(home)
    parent = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert "eval/candidate/kl" in parent.data.metrics and "eval/win_rate/oracle_vs_champion" in parent.data.metrics
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["tiny-preferences"]
    children = child_runs(client, parent.info.run_id)
    contexts = {t.value for d in children["dpo"][0].inputs.dataset_inputs for t in d.tags
                if t.key == "mlflow.data.context"}
    assert "training" in contexts
    assert children["evaluate"][0].inputs.dataset_inputs
    APILogHandler().flush()
    flow_run_id = summary["flow_run_id"]
    with get_client(sync_client=True) as prefect:
        for _ in range(20):  # the log worker sends in the background
            logs = [log.message for log in prefect.read_logs(filters.LogFilter(
                flow_run_id=filters.LogFilterFlowRunId(any_=[flow_run_id])))]
            if any(m.startswith("Gate:") for m in logs):
                break
            time.sleep(0.5)
        artifacts = {a.key: a for a in prefect.read_artifacts(
            artifact_filter=filters.ArtifactFilter(flow_run_id=filters.ArtifactFilterFlowRunId(any_=[flow_run_id])))}
    assert any(m.startswith("train dpo: step") and "loss" in m for m in logs), logs
    assert "Gate: tiny-policy v1 PROMOTED to champion" in logs
    assert any(m.startswith("Gate reason: ") for m in logs)
    assert any(m.startswith("evaluate: 1 response(s) for each of") for m in logs), logs
    assert any(m.startswith("Round tiny: promoted") for m in logs)
    assert float(artifacts["train-dpo-progress"].data) == 100.0
    assert "vNone" not in artifacts["tiny-gate-decision"].data


def test_rerun_with_no_new_data_trains_nothing(first_round, demo_cache, clean_mlflow_env):
    home, _ = first_round
    started = time.monotonic()
    again = alignment_pipeline(config=TINY, overrides=overrides(home, demo_cache))
    elapsed = time.monotonic() - started
    assert again["status"] == "unchanged"
    client = use_store(home)
    assert set(child_runs(client, again["mlflow_run_id"])) <= {"ingest"}
    assert tracking.alias_version("tiny-policy", "champion") == "1"
    assert len(client.search_model_versions("name = 'tiny-policy'")) == 1
    assert elapsed < 60
    scheduled = alignment_pipeline(config=TINY, overrides=overrides(home, demo_cache), only_if_new_data=True)
    assert scheduled["status"] == "no-new-data"
    assert {s["stage"]: s["status"] for s in again["stages"]}["build preferences"] == "cached"
    # the cache hit above loaded a JSON record: no pickle anywhere in Prefect's result storage (issue 14)
    storage = get_current_settings().results.local_storage_path
    assert pickles_under(storage) == []
    entries = [json.loads(p.read_text()) for p in (storage / "keys").iterdir()]
    assert entries and all(e["serializer"]["type"] == SERIALIZER_TYPE for e in entries)


def test_gate_rejection_keeps_champion_and_rollback_restores_it(prefect_harness, demo_cache, tmp_path,
                                                                clean_mlflow_env):
    home = tmp_path / "home"
    first = alignment_pipeline(config=TINY, overrides=overrides(home, demo_cache))
    assert first["status"] == "promoted"
    cfg = load_pipeline_config(TINY, overrides(home, demo_cache))
    use_store(home)
    champion = champion_record(cfg)
    base = demo_base_model(cfg)
    simulate_round(cfg, champion, base, round_index=1)
    # the second round is judged by the champion's reward model (v1), which never saw its feedback
    strict = alignment_pipeline(config=TINY, overrides=overrides(home, demo_cache, "gate.min_win_rate_lower_bound=1.0",
                                                                  "gate.reward_judge=champion"))
    assert strict["status"] == "not-promoted"
    client = use_store(home)
    assert tracking.alias_version("tiny-policy", "champion") == "1"
    assert tracking.alias_version("tiny-policy", "challenger") == "2"
    v2 = client.get_model_version("tiny-policy", "2").tags
    assert v2["alignflow.gate"] == "failed"
    assert "Judge: the champion's reward model" in v2["alignflow.gate_reasons"]
    assert v2["alignflow.judge.reward_model"] == "champion reward model v1"
    assert "alignflow.judge.champion_reward.test.accuracy" in v2
    rewards = {v: client.get_model_version("tiny-reward", v).tags for v in ("1", "2")}
    assert [rewards[v]["alignflow.policy_version"] for v in ("1", "2")] == ["1", "2"]
    assert "alignflow.judge.test.accuracy" in rewards["1"]  # round 1 judged by its own: its record
    assert "alignflow.judge.test.accuracy" not in rewards["2"]  # round 2's model did not judge
    # found through the champion policy, not the reward model's alias (which moves first at promotion)
    client.set_registered_model_alias("tiny-reward", "champion", "2")
    assert champion_reward_record(cfg, tracking.alias_version("tiny-policy", "champion")).registry_version == "1"
    client.set_registered_model_alias("tiny-reward", "champion", "1")
    # the next batch is v1's again; with preferences.replay_refused its build also reads the refused round's batch
    simulate_round(cfg, champion, base, round_index=2)
    replay = load_pipeline_config(TINY, overrides(home, demo_cache, "preferences.replay_refused=true"))
    refused = [r.batch_id for r in RoundLog(data_dir(cfg)).ended_rounds() if r.state == "rejected"]
    ingest = run_ingest(replay, None)
    assert ingest.new_files and ingest.replayed_batches == refused and len(refused) == 1
    assert ingest.validated_digest == run_ingest(cfg.model_copy(update={"preferences": cfg.preferences.model_copy(
        update={"recent_batches": 2})}), None).validated_digest  # the newest two batches: the same files
    assert run_build(replay, ingest, None).num_pairs > run_build(cfg, run_ingest(cfg, None), None).num_pairs
    args = ["--config", TINY, *sum((["--set", o] for o in overrides(home, demo_cache)), [])]
    assert cli_main(["promote", "--version", "2", *args]) == 0
    use_store(home)
    assert tracking.alias_version("tiny-policy", "champion") == "2"
    assert cli_main(["rollback", *args]) == 0
    use_store(home)
    assert tracking.alias_version("tiny-policy", "champion") == "1"
    assert cli_main(["rollback", *args]) == 1  # v1 is the only promoted version left


def test_drift_triggers_the_retraining_deployment(first_round, demo_cache, clean_mlflow_env):
    home, _ = first_round
    from prefect.client.orchestration import get_client

    from flows.deployments import build_deployments
    from flows.monitor import monitor_feedback

    cfg = load_pipeline_config(TINY, overrides(home, demo_cache))
    for deployment in build_deployments(cfg, TINY, overrides(home, demo_cache)):
        deployment.apply()
    landing = cfg.home / "landing" / "tiny"
    shifted = pd.DataFrame({
        "prompt": [f"Quarterly earnings call transcript number {i} discussing revenue guidance" for i in range(80)],
        "response_a": ["Revenue grew eleven percent while operating margins compressed sharply"] * 80,
        "response_b": ["Analysts questioned the capital expenditure plan for the fiscal year"] * 80,
        "choice": ["a"] * 80,
        "annotator_id": [f"ann-{i % 3}" for i in range(80)],
    })
    shifted.to_json(landing / "shifted-batch.jsonl", orient="records", lines=True)
    result = monitor_feedback(config=TINY, overrides=overrides(home, demo_cache))
    assert result is not None and result["triggered"], result
    assert result["retraining_flow_run"], result

    async def read_run(run_id):
        async with get_client() as client:
            return await client.read_flow_run(run_id)

    import asyncio

    run = asyncio.run(read_run(result["retraining_flow_run"]))
    assert "drift-triggered" in run.tags
    client = use_store(home)
    monitor_runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                                      filter_string="tags.`alignflow.stage` = 'monitor'")
    assert monitor_runs and monitor_runs[0].data.tags["alignflow.drift"] == "triggered"
    assert json.loads(json.dumps(result["metrics"]))
