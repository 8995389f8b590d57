"""The production set-up for real: PostgreSQL, an MLflow tracking server on it (basic auth,
artifacts proxied by the server), a Prefect server on it (auth), a process work pool and a worker,
all started by tests/integration/servers.py. Deployments come from infra/prefect.yaml through
``prefect deploy``; runs are triggered through the Prefect API.

- Two runs of the deployment at once (a fast stand-in flow with the pipeline's parameters and
  registry writes): the deployment's concurrency limit queues the second, both complete, and the
  MLflow server holds both runs, both model versions and exactly one ``champion``.
- One round of the real pipeline (configs/tiny.yaml) on the worker: parent and child runs, the
  registered policy with its ``champion`` alias, weights in the server's artifact store.

Loopback only, random free ports; every process is stopped (process group) even when a test
fails. Needs Debian's ``postgresql`` (installed with apt-get when missing and running as root;
skipped otherwise).
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.integration.servers import REPO_ROOT, VENV_BIN, ServerStack, ServersUnavailable

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(480)]

PREFECT_YAML = REPO_ROOT / "infra" / "prefect.yaml"
DEPLOYMENT = "retrain"
STANDIN_ENTRYPOINT = "tests/integration/standin_flow.py:standin_pipeline"
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def stack(tmp_path_factory, request) -> ServerStack:
    st = ServerStack(root=tmp_path_factory.mktemp("stack"))
    request.addfinalizer(st.stop)  # before start: a half-started stack is stopped too
    try:
        st.start()
    except ServersUnavailable as err:
        pytest.skip(str(err))
    st.bootstrap(gpu_slots=1)
    # flow runs start in the deployment's pull directory (the checkout): give them their own home
    st.start_worker(limit=2, extra_env={"ALIGNFLOW_HOME": str(st.root / "home")})
    return st


def deploy(stack: ServerStack, name: str, entrypoint: str | None = None, parameters: dict | None = None) -> str:
    """``prefect deploy`` one deployment of infra/prefect.yaml; returns ``flow-name/deployment``.

    ``entrypoint`` replaces the file's entrypoint (the stand-in flow), ``parameters`` update its
    parameters (what an operator edits: a run may not pass another config, tasks/trusted.py);
    everything else, pull step, schedule and pool, is the committed file's.
    """
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    chosen = [d for d in spec["deployments"] if d["name"] == name]
    assert chosen, f"{name} not in {PREFECT_YAML}"
    if entrypoint:
        chosen[0]["entrypoint"] = entrypoint
    chosen[0]["parameters"].update(parameters or {})
    spec["deployments"] = chosen
    spec["deployments"][0]["work_pool"]["name"] = stack.pool
    path = stack.root / "prefect.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    done = subprocess.run(
        [str(VENV_BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", str(path), "--name", name],
        cwd=REPO_ROOT, env=stack.env(ALIGNFLOW_CODE_DIR=str(REPO_ROOT)),
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, f"prefect deploy failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        # deployment names repeat across flows (the stand-in's `retrain` and the pipeline's)
        match = [d for d in deployments if d.name == name and d.entrypoint == chosen[0]["entrypoint"]]
        assert match, f"deployment {name} not on the server after prefect deploy:\n{done.stdout[-2000:]}"
        flow = client.read_flow(match[0].flow_id)
        schedules = match[0].schedules
    expected_cron = chosen[0]["schedules"][0]["cron"]
    assert [s.schedule.cron for s in schedules] == [expected_cron]
    assert match[0].global_concurrency_limit is not None and match[0].global_concurrency_limit.limit == 1
    return f"{flow.name}/{name}"


def wait_final(flow_run_ids: list, timeout_s: float) -> list:
    """Poll the Prefect API until every flow run is in a final state; return the runs."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = [client.read_flow_run(i) for i in flow_run_ids]
            if all(r.state is not None and r.state.is_final() for r in runs):
                return runs
            if time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


def test_deployed_pipeline_runs_twice_at_once_and_registry_stays_consistent(stack, monkeypatch):
    for key, value in stack.client_env.items():
        monkeypatch.setenv(key, value)
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url, PREFECT_API_AUTH_STRING: stack.prefect_auth}):
        full_name = deploy(stack, DEPLOYMENT, entrypoint=STANDIN_ENTRYPOINT)
        started = [run_deployment(full_name, timeout=0,
                                  parameters={"config": None, "overrides": [f"seed={i}"], "only_if_new_data": False})
                   for i in range(2)]
        runs = wait_final([r.id for r in started], RUN_TIMEOUT_S)
    states = [(r.name, r.state.type.value if r.state else None) for r in runs]
    assert all(r.state is not None and r.state.is_completed() for r in runs), \
        f"flow runs did not complete: {states}\n{stack.logs()}"
    # the deployment's limit (one run of a pipeline at a time, ENQUEUE) made the second wait, not fail
    first, second = sorted(runs, key=lambda r: r.start_time)
    assert second.start_time >= first.end_time, [(r.name, r.start_time, r.end_time) for r in runs]

    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name("standin")
    assert experiment is not None, stack.logs()
    parents = client.search_runs([experiment.experiment_id], "tags.`prefect.flow_run_id` != ''")
    assert sorted(r.data.tags["prefect.flow_run_id"] for r in parents) == sorted(str(r.id) for r in runs)
    assert all(r.info.status == "FINISHED" for r in parents)

    versions = client.search_model_versions("name = 'standin-policy'")
    assert sorted(int(v.version) for v in versions) == [1, 2], "both runs must have registered a version"
    assert {v.tags["prefect.flow_run_id"] for v in versions} == {str(r.id) for r in runs}
    champion = client.get_model_version_by_alias("standin-policy", "champion")
    assert champion.version == "2"
    holders = [v for v in versions if "champion" in client.get_model_version("standin-policy", v.version).aliases]
    assert len(holders) == 1

    # artifacts went through the server's proxy and come back through it
    child = client.get_run(champion.run_id)
    assert child.info.artifact_uri.startswith("mlflow-artifacts:")
    local = client.download_artifacts(champion.run_id, "model/model.json", str(stack.root / "dl"))
    assert Path(local).read_text().startswith("{")
    assert list((stack.root / "artifacts").rglob("model.json")), "artifacts must land in the server's store"

    # both servers refuse requests without credentials
    for url in (f"{stack.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=standin",
                f"{stack.prefect_api_url}/flow_runs/{runs[0].id}"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401, url
    assert os.environ["MLFLOW_TRACKING_URI"] == stack.mlflow_uri


# ----------------------------------------------------------------------------- the real pipeline

TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def pipeline_deployment(stack, demo_cache) -> str:
    """The committed ``retrain`` deployment of the pipeline (flows/pipeline.py), deployed once for
    the two tests that run it (each deploy is a ``prefect deploy`` process)."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    overrides = [f"demo.cache_dir={demo_cache}"]  # the demo base model, shared with the pipeline tests
    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url, PREFECT_API_AUTH_STRING: stack.prefect_auth}):
        full_name = deploy(stack, DEPLOYMENT, parameters={"config": str(TINY_CONFIG), "overrides": overrides})
    assert full_name == "alignment-pipeline/retrain"
    return full_name


@pytest.mark.skipif(not TINY_CONFIG.exists(), reason="configs/tiny.yaml (the pipeline's test config) is missing")
def test_real_pipeline_round_on_the_servers(stack, pipeline_deployment, demo_cache, monkeypatch):
    """The committed ``retrain`` deployment (flows/pipeline.py) runs one round of the tiny pipeline
    on the worker: everything lands on the servers, model weights in the server's artifact store."""
    from tasks.config import load_pipeline_config

    overrides = [f"demo.cache_dir={demo_cache}"]  # the demo base model, shared with the pipeline tests
    cfg = load_pipeline_config(TINY_CONFIG, overrides)
    for key, value in stack.client_env.items():
        monkeypatch.setenv(key, value)
    from mlflow import MlflowClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url, PREFECT_API_AUTH_STRING: stack.prefect_auth}):
        full_name = pipeline_deployment
        started = run_deployment(full_name, timeout=0, parameters={
            "config": str(TINY_CONFIG), "overrides": overrides, "only_if_new_data": False})
        (run,) = wait_final([started.id], RUN_TIMEOUT_S)
    assert run.state is not None and run.state.is_completed(), \
        f"pipeline run ended {run.state and run.state.type.value}\n{stack.logs(80)}"

    client = MlflowClient(tracking_uri=stack.mlflow_uri, registry_uri=stack.mlflow_uri)
    name = cfg.pipeline.name
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name!r} on the server\n{stack.logs(80)}"
    parents = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert len(parents) == 1, "one parent run per flow run, tagged with its id"
    assert parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(children) >= 3, [c.info.run_name for c in children]
    versions = client.search_model_versions(f"name = '{name}-policy'")
    assert len(versions) == 1
    champion = client.get_model_version_by_alias(f"{name}-policy", "champion")
    assert champion.version == versions[0].version and champion.tags
    assert client.get_run(champion.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert list((stack.root / "artifacts").rglob("*.safetensors")), "weights must land in the server's store"


@pytest.mark.skipif(not TINY_CONFIG.exists(), reason="configs/tiny.yaml (the pipeline's test config) is missing")
def test_a_deployment_run_cannot_set_code_executing_settings(stack, pipeline_deployment, monkeypatch):
    """Whoever may start runs of ``retrain`` cannot make the worker import a reward function: the
    flow run fails at once, naming the field (issue 14, tasks/trusted.py)."""
    for key, value in stack.client_env.items():
        monkeypatch.setenv(key, value)
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.prefect_api_url, PREFECT_API_AUTH_STRING: stack.prefect_auth}):
        started = run_deployment(pipeline_deployment, timeout=0, parameters={
            "overrides": ["ppo.reward_fn=os:system"], "only_if_new_data": False})
        (run,) = wait_final([started.id], RUN_TIMEOUT_S)
    assert run.state is not None and run.state.is_failed(), f"{run.state}\n{stack.logs(40)}"
    assert "ppo.reward_fn: cannot be set by a deployment run" in (run.state.message or ""), run.state.message
