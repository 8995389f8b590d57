"""Static checks of infra/: no Docker engine or cluster runs in CI, so the compose file, the
Prefect deployments, the Kubernetes base job template, the Helm values and the accelerate configs
are parsed and cross-checked with the real parsers (Prefect's prefect.yaml model and templating,
accelerate's launch-argument validation). The process pool, bootstrap script and prefect.yaml run
for real in tests/integration/test_real_servers.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PREFECT_YAML = yaml.safe_load((INFRA / "prefect.yaml").read_text())
TEMPLATE = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)")


def env_example() -> dict[str, str]:
    pairs = [ln.split("=", 1) for ln in (INFRA / ".env.example").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    return {k: v for k, v in pairs}


def load_bootstrap():
    sys.path.insert(0, str(INFRA))
    try:
        import bootstrap_prefect
    finally:
        sys.path.remove(str(INFRA))
    return bootstrap_prefect


# ----------------------------------------------------------------------------- compose


def test_compose_has_the_stack_and_its_references_resolve():
    assert set(SERVICES) == {"preflight", "postgres", "minio", "minio-init", "mlflow", "prefect-server",
                             "prefect-init", "worker"}
    for name, svc in SERVICES.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            assert cond["condition"] in ("service_healthy", "service_completed_successfully", "service_started")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: bind source {source} missing"
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} not declared"
        if "build" in svc:
            context = (INFRA / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).exists(), f"{name}: Dockerfile missing"


def test_compose_publishes_on_loopback_only_and_takes_every_secret_from_the_env_file():
    example = env_example()
    assert example["BIND_ADDRESS"] == "127.0.0.1"
    text = (INFRA / "docker-compose.yml").read_text() + (INFRA / "docker-compose.gpu.yml").read_text()
    assert set(VAR_RE.findall(text)) <= set(example), "every ${VAR} must be documented in .env.example"
    for name, svc in SERVICES.items():
        for port in svc.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name} publishes {port} beyond loopback"
        env = svc.get("environment") or {}
        for key, value in env.items() if isinstance(env, dict) else []:
            if re.search(r"PASSWORD|SECRET|AUTH_STRING|ACCESS_KEY", key):
                assert "${" in str(value), f"{name}.{key} must come from infra/.env, not the compose file"
    assert all(v.startswith(("change-me", "admin:change-me")) for k, v in example.items()
               if re.search(r"PASSWORD|SECRET|AUTH_STRING", k)), "the example must hold placeholders only"
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
        assert ignored.returncode == 0, "infra/.env must be git-ignored"


def test_compose_wires_postgres_minio_mlflow_and_prefect_together():
    created = re.findall(r"CREATE DATABASE (\w+)", (INFRA / "docker" / "postgres-init.sh").read_text())
    mlflow_cmd = SERVICES["mlflow"]["command"]
    mlflow_env = SERVICES["mlflow"]["environment"]
    backend = mlflow_env["MLFLOW_BACKEND_STORE_URI"]  # mlflow server reads it: not on its command line
    assert backend.startswith("postgresql+psycopg://") and backend.rsplit("/", 1)[1] in created
    assert "--serve-artifacts" in mlflow_cmd
    assert mlflow_cmd[mlflow_cmd.index("--artifacts-destination") + 1].startswith("s3://")
    assert mlflow_env["MLFLOW_AUTH_DATABASE_URI"].rsplit("/", 1)[1] in created
    assert urlparse(mlflow_env["MLFLOW_S3_ENDPOINT_URL"]).hostname in SERVICES
    entrypoint = (INFRA / "docker" / "mlflow-entrypoint.sh").read_text()
    assert "--app-name basic-auth" in entrypoint and "MLFLOW_AUTH_CONFIG_PATH" in entrypoint
    prefect_db = SERVICES["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.rsplit("/", 1)[1] in created
    worker_env = SERVICES["worker"]["environment"]  # YAML merge keys (<<) already resolved
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        assert urlparse(worker_env[key]).hostname in SERVICES, key
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
        assert key in worker_env
    assert not any(k.startswith("AWS_") for k in worker_env), "workers reach artifacts through the MLflow server"
    pool_cmd = " ".join(SERVICES["worker"]["command"])
    assert "--pool alignflow-process" in pool_cmd and "--type process" in pool_cmd
    assert "--pool alignflow-process --type process" in SERVICES["prefect-init"]["command"][2]


CHECK_ENV = INFRA / "docker" / "check-env.sh"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|AUTH_STRING")


def _good_env(tmp_path: Path) -> Path:
    """infra/.env.example with every change-me value replaced by a fresh secret."""
    import secrets

    lines = []
    for line in (INFRA / ".env.example").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#") and "change-me" in value:
            value = f"admin:{secrets.token_hex(24)}" if key == "PREFECT_AUTH_STRING" else secrets.token_hex(24)
        lines.append(f"{key}{sep}{value}")
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check_env(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CHECK_ENV), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_the_stack_refuses_to_start_on_the_example_values():
    refused = _check_env(str(INFRA / ".env.example"))
    assert refused.returncode == 1
    for key in (k for k in env_example() if SECRET_KEY.search(k)):
        assert f"check-env: {key} still holds the example value" in refused.stderr, key
    assert "refusing to start" in refused.stderr


def test_the_guard_accepts_real_secrets_from_a_file_and_from_its_environment(tmp_path):
    good = _good_env(tmp_path)
    assert _check_env(str(good)).returncode == 0, _check_env(str(good)).stderr
    values = dict(line.split("=", 1) for line in good.read_text().splitlines() if line and not line.startswith("#"))
    assert _check_env(env=values).returncode == 0  # how the preflight service runs it
    weak = {**values, "MLFLOW_DB_PASSWORD": values["POSTGRES_PASSWORD"], "MINIO_ROOT_PASSWORD": "short"}
    refused = _check_env(env=weak)
    assert refused.returncode == 1
    assert "MLFLOW_DB_PASSWORD must differ" in refused.stderr and "MINIO_ROOT_PASSWORD is shorter" in refused.stderr
    missing = {k: v for k, v in values.items() if k != "PREFECT_DB_PASSWORD"}
    assert "PREFECT_DB_PASSWORD is not set" in _check_env(env=missing).stderr


def test_every_service_waits_for_the_preflight_check():
    preflight = SERVICES["preflight"]
    assert preflight["entrypoint"] == ["sh", "/check-env.sh"]
    assert "./docker/check-env.sh:/check-env.sh:ro" in preflight["volumes"]
    checked = set(preflight["environment"])
    assert {k for k in env_example() if SECRET_KEY.search(k)} <= checked, "the guard sees every secret"

    def reaches_preflight(name: str) -> bool:
        deps = SERVICES[name].get("depends_on") or {}
        return "preflight" in deps or any(reaches_preflight(d) for d in deps)

    for name in set(SERVICES) - {"preflight"}:
        assert reaches_preflight(name), f"{name} could start without the preflight check"
    assert SERVICES["postgres"]["depends_on"]["preflight"]["condition"] == "service_completed_successfully"


def test_each_service_connects_as_its_own_postgres_role():
    init = (INFRA / "docker" / "postgres-init.sh").read_text()
    owners = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+)", init))
    assert owners == {"prefect": "prefect", "mlflow": "mlflow", "mlflow_auth": "mlflow"}
    assert set(re.findall(r"CREATE ROLE (\w+) LOGIN", init)) == {"prefect", "mlflow"}
    assert "\\getenv prefect_pw PREFECT_DB_PASSWORD" in init and "REVOKE ALL ON DATABASE prefect FROM PUBLIC" in init
    mounts = SERVICES["postgres"]["volumes"]
    assert "./docker/postgres-init.sh:/docker-entrypoint-initdb.d/10-roles.sh:ro" in mounts
    assert (INFRA / "docker" / "postgres-init.sh").stat().st_mode & 0o111, "the postgres image runs it only if executable"
    uris = {"mlflow": SERVICES["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"],
            "mlflow_auth": SERVICES["mlflow"]["environment"]["MLFLOW_AUTH_DATABASE_URI"],
            "prefect": SERVICES["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]}
    for db, uri in uris.items():
        user = urlparse(uri).username
        assert user == owners[db] and "POSTGRES" not in uri, f"{db}: connects as {user}, not its own role"
    assert "PREFECT_DB_PASSWORD" in uris["prefect"] and "MLFLOW_DB_PASSWORD" in uris["mlflow"]


def test_no_password_is_on_a_command_line():
    for name, svc in SERVICES.items():
        argv = " ".join(str(part) for key in ("command", "entrypoint") for part in (svc.get(key) or []))
        for var in VAR_RE.findall(argv) + re.findall(r"\$\$\{?([A-Z_]+)", argv):
            assert not SECRET_KEY.search(var), f"{name} puts ${var} on its command line"
        assert not re.search(r"://[^/\s]*@", argv), f"{name}: a URL with credentials on its command line"
    entrypoint = (INFRA / "docker" / "mlflow-entrypoint.sh").read_text()
    assert "PASSWORD" not in entrypoint.split("exec mlflow server", 1)[1]


def test_worker_image_persists_json_results_and_prints_no_unmasked_links():
    dockerfile = (INFRA / "docker" / "worker.Dockerfile").read_text()
    assert re.search(r"^\s*PREFECT_RESULTS_DEFAULT_SERIALIZER=json\b", dockerfile, re.M)
    assert re.search(r"^\s*MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true\b", dockerfile, re.M)


def test_worker_image_copies_what_exists_and_matches_the_pull_step():
    dockerfile = (INFRA / "docker" / "worker.Dockerfile").read_text()
    for src in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        if "*" not in src:
            assert (ROOT / src).exists(), f"worker image copies missing {src}"
    assert "ALIGNFLOW_CODE_DIR=/opt/alignflow" in dockerfile
    pull = PREFECT_YAML["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    assert pull == "{{ $ALIGNFLOW_CODE_DIR }}"


# ----------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_is_valid_for_prefect_and_uses_the_bootstrapped_pools():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule

    model = PrefectYamlModel.model_validate(PREFECT_YAML)
    names = {d.name: d for d in model.deployments}
    assert set(names) == {"retrain", "monitor", "retrain-gpu"}
    assert names["retrain"].work_pool.name == load_bootstrap().parse_args([]).pool == "alignflow-process"
    worker_values = yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())
    assert names["retrain-gpu"].work_pool.name == worker_values["worker"]["config"]["workPool"]
    for dep in model.deployments:
        for sched in PREFECT_YAML["deployments"][[d.name for d in model.deployments].index(dep.name)]["schedules"]:
            CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # raises on a bad cron
    assert names["retrain"].parameters["only_if_new_data"] is True


@pytest.mark.parametrize("name", ["retrain", "monitor"])
def test_prefect_yaml_entrypoints_are_flows_taking_its_parameters(name):
    spec = next(d for d in PREFECT_YAML["deployments"] if d["name"] == name)
    path, func = spec["entrypoint"].split(":")
    if not (ROOT / path).exists():
        pytest.skip(f"{path} is not written yet")
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(str(ROOT / spec["entrypoint"]))
    accepted = set(flow.parameters.properties)
    assert set(spec["parameters"]) <= accepted, f"{name}: {set(spec['parameters']) - accepted} not parameters of {func}"


# ----------------------------------------------------------------------------- Kubernetes


def render_job(**job_variables):
    from prefect.utilities.templating import apply_values

    props = TEMPLATE["variables"]["properties"]
    values = {k: v["default"] for k, v in props.items() if "default" in v}
    values.update(name="retrain-abc", command="prefect flow-run execute", env={"A": "1"}, labels={"x": "y"},
                  **job_variables)
    return apply_values(TEMPLATE["job_configuration"], values)["job_manifest"]


def test_base_job_template_defines_every_placeholder_and_selects_gpu_nodes():
    from prefect.utilities.templating import find_placeholders

    used = {p.name for p in find_placeholders(TEMPLATE["job_configuration"])}
    assert used <= set(TEMPLATE["variables"]["properties"])
    job = render_job()
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "prefect-job" and pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 == container["resources"]["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    assert container["envFrom"] == [{"secretRef": {"name": "alignflow-clients"}}]
    eight = render_job(gpus=8, node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"})
    eight_pod = eight["spec"]["template"]["spec"]
    assert eight_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert eight_pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert load_bootstrap().base_job_template("kubernetes", INFRA / "k8s" / "base-job-template.json") == TEMPLATE


def test_helm_values_and_secret_shapes_agree():
    server = yaml.safe_load((INFRA / "k8s" / "prefect-server-values.yaml").read_text())
    worker = yaml.safe_load((INFRA / "k8s" / "prefect-worker-values.yaml").read_text())
    mlflow = yaml.safe_load((INFRA / "k8s" / "mlflow-values.yaml").read_text())
    secrets = {d["metadata"]["name"]: d["stringData"]
               for d in yaml.safe_load_all((INFRA / "k8s" / "secrets.example.yaml").read_text())}
    assert server["postgresql"]["enabled"] is False and "connection-string" in secrets[server["secret"]["name"]]
    assert "auth-string" in secrets[server["server"]["basicAuth"]["existingSecret"]]
    assert worker["worker"]["config"]["type"] == "kubernetes"
    ref = worker["worker"]["extraEnvVars"][0]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secrets[ref["name"]]
    assert mlflow["server"]["value_options"]["app_name"] == "basic-auth"
    assert "serve_artifacts" in mlflow["server"]["flag_options"]
    db = mlflow["mlflow"]["backendStoreUriFrom"]["secretKeyRef"]
    assert secrets[db["name"]][db["key"]].startswith("postgresql+psycopg://")
    client = TEMPLATE["variables"]["properties"]["client_secret"]["default"]
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(secrets[client])
    assert all("REPLACE" in v or not re.search(r"PASSWORD|SECRET|password|secret", k)
               for s in secrets.values() for k, v in s.items()), "secrets.example.yaml holds placeholders only"


# ----------------------------------------------------------------------------- accelerate


def launch_env_of(config: str, processes: int) -> tuple:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(INFRA / "accelerate" / config), "--num_processes", str(processes), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


def test_accelerate_ddp_config_launches_one_process_per_gpu():
    args, env = launch_env_of("ddp.yaml", 4)
    assert args.multi_gpu and not args.use_fsdp and args.num_processes == 4 and args.gpu_ids == "all"
    assert env.get("ACCELERATE_USE_FSDP", "false") == "false"


@pytest.mark.parametrize("processes", [2, 8])
def test_accelerate_fsdp_config_is_fsdp2_with_full_state_dict(processes):
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    args, env = launch_env_of("fsdp.yaml", processes)
    assert args.use_fsdp and args.num_processes == processes
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is False


def test_bootstrap_refuses_a_kubernetes_pool_without_template():
    bootstrap = load_bootstrap()
    with pytest.raises(SystemExit, match="base-job-template"):
        bootstrap.base_job_template("kubernetes", None)
    assert "job_configuration" in bootstrap.base_job_template("process", None)
