"""Two or more pipeline runs at once against the embedded stores (the documented limit in
infra/README.md, "Concurrency"): the MLflow SQLite store under the pipeline's home takes
concurrent writers, including processes that create it at the same moment. The production set-up (PostgreSQL behind servers) is exercised the same way in
tests/integration/test_real_servers.py.

Each process does what one pipeline run does to the store, through the real tracking module
(:mod:`tasks.tracking`): configure the store, a parent and a child run with per-step metrics and
params, a new model version, and a promotion of ``champion``.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "demo-policy"


def one_round(home: str, tag: str, steps: int = 100) -> None:
    """One pipeline run's worth of writes to the embedded store (run in a child process)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks import tracking

    experiment = tracking.configure(Path(home), "demo")
    parent = tracking.start_parent_run(experiment, f"run-{tag}", {"prefect.flow_run_id": tag})
    with tracking.child_run(parent, "train") as child:
        for step in range(steps):
            tracking.log_metrics(child, {"loss": 1.0 / (step + 1), "kl": 0.01 * step}, step=step)
        tracking.log_params(child, {f"p{i}": i for i in range(40)})
    client = MlflowClient()
    try:
        client.create_registered_model(MODEL)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(child).info.artifact_uri}/model"
    version = client.create_model_version(MODEL, source, run_id=child, tags={"run": tag}).version
    tracking.promote(MODEL, str(version), reason=tag)
    tracking.end_run(parent)


def run_concurrently(home: Path, tags: list[str]) -> list[subprocess.CompletedProcess]:
    code = "import sys; from tests.integration.test_concurrency import one_round; one_round(sys.argv[1], sys.argv[2])"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(home), "GIT_PYTHON_REFRESH": "quiet"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home), tag], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in tags]
    done = []
    for proc, tag in zip(procs, tags, strict=True):
        out, err = proc.communicate(timeout=180)
        done.append(subprocess.CompletedProcess([tag], proc.returncode, out, err))
    return done


def store_facts(db: Path) -> dict:
    with sqlite3.connect(db) as con:
        return {
            "integrity": con.execute("PRAGMA integrity_check").fetchone()[0],
            "versions": sorted(int(v) for (v,) in con.execute("SELECT version FROM model_versions")),
            "champions": con.execute(
                "SELECT version FROM registered_model_aliases WHERE alias = 'champion'").fetchall(),
            "parents": con.execute(
                "SELECT count(*) FROM tags WHERE key = 'prefect.flow_run_id'").fetchone()[0],
            "metric_rows": con.execute("SELECT count(*) FROM metrics WHERE key = 'loss'").fetchone()[0],
        }


def test_concurrent_runs_on_an_existing_embedded_store_all_finish_and_agree(tmp_path):
    home = tmp_path / "home"
    first = run_concurrently(home, ["first"])[0]  # creates the store, as the first `alignflow run` does
    assert first.returncode == 0, first.stderr[-3000:]
    tags = ["a", "b", "c"]
    results = run_concurrently(home, tags)
    for res in results:
        assert res.returncode == 0, f"run {res.args[0]} failed on the SQLite store:\n{res.stderr[-3000:]}"
    facts = store_facts(home / "mlflow.db")
    assert facts["integrity"] == "ok"
    assert facts["versions"] == [1, 2, 3, 4], "every run's version is recorded"
    assert len(facts["champions"]) == 1 and facts["champions"][0][0] in facts["versions"]
    assert facts["parents"] == 4 and facts["metric_rows"] == 4 * 100


def test_runs_starting_together_on_a_new_store_all_finish(tmp_path):
    """Processes that create a brand-new SQLite store at the same moment used to race in MLflow's
    schema creation: the losers failed and leftover ``_alembic_tmp_*`` tables could leave the store
    unusable for every later run (seen 2 times in 4 tries with three processes). ``configure``
    now creates the store under a file lock; the first ``champion`` is also set by all three at
    once, which exercises the alias-insert retry."""
    home = tmp_path / "home"
    results = run_concurrently(home, ["x", "y", "z"])
    for res in results:
        assert res.returncode == 0, f"run {res.args[0]} failed on a new SQLite store:\n{res.stderr[-3000:]}"
    facts = store_facts(home / "mlflow.db")
    assert facts["integrity"] == "ok" and facts["versions"] == [1, 2, 3]
    assert len(facts["champions"]) == 1
    with sqlite3.connect(home / "mlflow.db") as con:
        leftovers = con.execute("SELECT name FROM sqlite_master WHERE name LIKE '_alembic_tmp%'").fetchall()
    assert leftovers == []
