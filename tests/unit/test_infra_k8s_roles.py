"""Kubernetes: one PostgreSQL role per service, as compose (issue 14, point 4). No cluster or helm
binary runs in CI: the Helm values, the Secret shapes and the roles Job are parsed as YAML and
cross-checked with the script compose runs (infra/docker/postgres-init.sh)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from urllib.parse import urlparse

import yaml

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"
INIT = (K8S.parent / "docker" / "postgres-init.sh").read_text()
JOB = yaml.safe_load((K8S / "postgres-roles-job.yaml").read_text())
SECRETS = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all((K8S / "secrets.example.yaml").read_text())}
SERVER = yaml.safe_load((K8S / "prefect-server-values.yaml").read_text())
MLFLOW = yaml.safe_load((K8S / "mlflow-values.yaml").read_text())
OWNERS = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+)", INIT))
"""Database -> the role the script makes its owner."""


def _service_uris() -> dict[str, str]:
    """Database -> the connection URI its service reads, found through the charts' values."""
    prefect = SECRETS[SERVER["secret"]["name"]]["connection-string"]
    ref = MLFLOW["mlflow"]["backendStoreUriFrom"]["secretKeyRef"]
    auth_volume = next(v for v in MLFLOW["extraVolumes"] if v["name"] == "mlflow-auth")
    ini = configparser.ConfigParser()
    ini.read_string(SECRETS[auth_volume["secret"]["secretName"]]["basic_auth.ini"])
    return {"prefect": prefect, "mlflow": SECRETS[ref["name"]][ref["key"]], "mlflow_auth": ini["mlflow"]["database_uri"]}


def _job_env() -> dict[str, dict]:
    [container] = JOB["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_each_service_connects_as_the_role_that_owns_its_database_and_never_as_the_admin():
    admin = SECRETS["postgres-admin"]["username"]
    uris = _service_uris()
    assert set(uris) == set(OWNERS) == {"prefect", "mlflow", "mlflow_auth"}
    for db, uri in uris.items():
        parsed = urlparse(uri)
        assert parsed.path == f"/{db}", f"{db}: the service's URI opens {parsed.path}"
        assert parsed.username == OWNERS[db] != admin, f"{db}: connects as {parsed.username}, not its own role"
    assert urlparse(uris["prefect"]).username != urlparse(uris["mlflow"]).username  # no role shared across services


def test_the_roles_job_runs_composes_script_with_every_password_from_the_services_secrets():
    spec = JOB["spec"]["template"]["spec"]
    [container] = spec["containers"]
    [volume] = spec["volumes"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert container["command"] == ["bash", f"{mount['mountPath']}/postgres-init.sh"]  # the very script compose runs
    assert volume["configMap"]["name"] == "alignflow-postgres-init"
    readme = (K8S.parent / "README.md").read_text()
    assert "--from-file=postgres-init.sh=infra/docker/postgres-init.sh" in readme  # how that ConfigMap is made
    env = _job_env()
    needed = set(re.findall(r"\$\{(\w+):\?", INIT)) | {"POSTGRES_USER", "PGPASSWORD", "PGHOST"}
    assert needed <= set(env)
    for name, item in env.items():  # every value from a Secret the example declares, none written in the Job
        assert "value" not in item, f"{name} is written in the Job"
        ref = item["valueFrom"]["secretKeyRef"]
        assert ref["key"] in SECRETS[ref["name"]], f"{name}: {ref} is not in secrets.example.yaml"
    # each service's password comes from the Secret its own chart reads, beside its connection string
    assert env["PREFECT_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == SERVER["secret"]["name"]
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == \
        MLFLOW["mlflow"]["backendStoreUriFrom"]["secretKeyRef"]["name"]
    assert env["POSTGRES_USER"]["valueFrom"]["secretKeyRef"]["name"] == "postgres-admin"


def test_no_password_is_on_a_command_line_or_in_the_helm_values():
    [container] = JOB["spec"]["template"]["spec"]["containers"]
    argv = " ".join(container.get("command", []) + container.get("args", []))
    assert "PASSWORD" not in argv and "://" not in argv
    for values in (SERVER, MLFLOW, yaml.safe_load((K8S / "prefect-worker-values.yaml").read_text())):
        text = yaml.safe_dump(values)
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "credentials in a URL of the Helm values"
        assert not re.search(r"(?i)password:\s*\S", text.replace("existingSecret", "")), "a password in the values"
