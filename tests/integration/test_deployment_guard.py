"""A real deployment on the Prefect test server: a run of it whose ``overrides`` set a
code-executing setting fails before any work, naming the field; the deployment's own parameters
(read back from the API) are trusted. Issue 14."""

from __future__ import annotations

import pytest

from alignment.config import ConfigError
from flows.pipeline import alignment_pipeline
from tasks.trusted import check_deployment_run, deployment_parameters
from tests.integration.pipeline_helpers import TINY

pytestmark = pytest.mark.integration


@pytest.fixture
def in_deployment_run(prefect_harness, monkeypatch):
    deployment = alignment_pipeline.to_deployment(
        name="guard-test", parameters={"config": TINY, "overrides": ["pipeline.accelerate_config=ops.yaml"]})
    deployment_id = deployment.apply()
    # what Prefect's runtime reports inside a run of that deployment
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", str(deployment_id))
    return deployment_id


def test_deployment_run_setting_reward_fn_fails_before_any_work(in_deployment_run, clean_mlflow_env,
                                                                 tmp_path, monkeypatch):
    assert deployment_parameters()["overrides"] == ["pipeline.accelerate_config=ops.yaml"]
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    with pytest.raises(ConfigError, match=r"ppo\.reward_fn: cannot be set by a deployment run"):
        alignment_pipeline(config=TINY, overrides=["dpo.beta=0.2", "ppo.reward_fn=os:system"])
    assert not home.exists(), "nothing ran"


def test_deployment_runs_keep_their_own_settings_and_harmless_overrides(in_deployment_run):
    check_deployment_run(TINY, ["pipeline.accelerate_config=ops.yaml", "dpo.beta=0.3"])
    with pytest.raises(ConfigError, match="pipeline.accelerate_config"):
        check_deployment_run(TINY, ["pipeline.accelerate_config=/tmp/other.yaml"])
