"""A round is a transaction (issue 14, point 1): SIGKILL the real ``alignflow run`` process at
every stage boundary and inside the demo's landing of its simulated batch, ingest, training,
evaluation and registration, re-run, and end
exactly where an uninterrupted run ends — same registry (versions, tags, aliases), same ledger,
same validated data and dataset — with every dead round's MLflow and Prefect runs closed.

How it shares work (one chain, not one home per kill point): run k is killed at point k; run
k+1 first recovers from that kill, then goes further and is killed at point k+1; the last run
has no fault and must finish the round. Each recovery is exercised by the run after it, and the
final state is compared with an uninterrupted reference run of the same config, which runs
beside the chain. (Two chains side by side took less wall time alone but ~12% more CPU, as the
second chain's first run trains the round again; under ``make test``'s two pytest workers the
other core runs other tests, so CPU is what counts.) Kills come from ``ALIGNFLOW_FAULT=<point>``
(tasks/faults.py): the process SIGKILLs itself there, so no ``finally`` or ``atexit`` code runs,
as in a real crash.
All runs use ``--only-if-new-data`` (the scheduled deployment's command), so a crashed or
failed round whose files were taken as consumed would show up as ``no-new-data`` instead of
being retried; one run of the chain fails for another reason than its data (training past
``pipeline.stage_timeout_s``) and the next must retry it. At the end, a run started while the
test holds the home's lock exits at once with a message naming the holder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.lock import home_lock
from tests.integration.pipeline_helpers import REPO, TINY, overrides

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.fault]

POINTS = [
    "land:simulated-file",  # the demo's first batch: its report written, one file of it landed
    "ingest",             # inside ingest: validated tables written, ledger not yet
    "after:ingested",
    "after:built",
    "fails",              # not a kill: training times out (a failure for another reason than its data)
    "train:reward",       # inside training: the recipe process runs (it dies with the flow)
    "train:dpo",
    "after:trained",
    "evaluate",           # inside evaluation: report computed, its MLflow run open
    "after:evaluated",
    "register:version",   # policy version created; no gate tags, no aliases yet
    "register:tags",      # gate tags written; aliases not moved
    "register:promote",   # reward model promoted; the policy's champion alias not yet
    "after:gated",        # registry complete; the round has not ended
    "end",                # the round's end recorded; its landing files not yet settled
]
VOLATILE_TAGS = {"alignflow.promoted_at", "alignflow.candidate_digest"}
"""Tags that differ between two homes without any crash: a time, and the training key (which
hashes the DPO reference cache folder under the home). The candidate digest is checked against
the chain's own training run instead."""


def _env(fault: str | None, api_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "ALIGNFLOW_FAULT"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PREFECT_API_URL=api_url)
    if fault:
        env["ALIGNFLOW_FAULT"] = fault
    return env


def _command(home: Path, cache: Path, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "flows.cli", "run", "--config", TINY, "--only-if-new-data"]
    for item in overrides(home, cache, *extra):
        args += ["--set", item]
    return args


def _start(home: Path, cache: Path, fault: str | None, api_url: str, log: Path) -> subprocess.Popen:
    if fault == "fails":  # the first training stage runs past its 1 s limit and is stopped
        return subprocess.Popen(_command(home, cache, "pipeline.stage_timeout_s=1"), stdout=log.open("w"),
                                stderr=subprocess.STDOUT, env=_env(None, api_url), cwd=REPO, start_new_session=True)
    return subprocess.Popen(_command(home, cache), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=_env(fault, api_url), cwd=REPO, start_new_session=True)


def _client(home: Path) -> MlflowClient:
    """A client of a home's embedded store (explicit URIs: the process's MLflow settings stay as they are)."""
    uri = f"sqlite:///{home}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _registry(client, pipeline: str = "tiny") -> dict:
    out = {}
    for name in (f"{pipeline}-policy", f"{pipeline}-reward"):
        versions = client.search_model_versions(f"name = '{name}'")
        out[name] = {
            "versions": {str(v.version): {k: t for k, t in v.tags.items() if k not in VOLATILE_TAGS}
                         for v in versions},
            "aliases": {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} if versions else {},
        }
    return out


def _table_digest(path: Path, home: Path) -> str:
    """Digest of a validated or quarantine table's rows, with the home's path (in ``source_file``)
    taken out: the same rows in two homes compare equal."""
    import hashlib

    import pyarrow.parquet as pq

    from tasks.data.handoff import open_validated

    table = open_validated(path) if path.suffix == ".arrow" else pq.read_table(path)
    text = json.dumps(table.to_pylist(), default=str, sort_keys=True)
    return hashlib.sha256(text.replace(str(home.resolve()), "<home>").replace(str(home), "<home>").encode()).hexdigest()


def _snapshot(home: Path) -> dict:
    """Everything a finished round leaves that must not depend on crashes."""
    client = _client(home)
    data = home / "data" / "tiny"
    ledger: dict[str, str] = {}
    for line in (data / "ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        ledger[entry["digest"]] = entry["state"]
    files = {str(p.relative_to(data)): _table_digest(p, home)
             for sub in ("validated", "quarantine") for p in sorted((data / sub).rglob("*")) if p.is_file()}
    datasets = {p.name: json.loads((p / "card.json").read_text())["digest"] for p in (data / "preferences").iterdir()}
    landing = sorted(p.name for p in (home / "landing" / "tiny").iterdir())
    round_record = json.loads((data / "round.json").read_text())
    return {"registry": _registry(client), "ledger": ledger, "files": files, "landing": landing,
            "datasets": datasets, "settled": round_record["settled"]}


def _open_runs(home: Path) -> list[str]:
    client = _client(home)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
    return [f"{r.info.run_name} ({r.info.run_id})" for r in runs]


def _flow_run_ids(home: Path) -> list[str]:
    client = _client(home)
    experiment = client.get_experiment_by_name("tiny")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`prefect.flow_run_id` != ''")
    return [r.data.tags["prefect.flow_run_id"] for r in parents]


def _run_chain(home: Path, cache: Path, api_url: str, logs: Path, after_first_kill: Callable[[], None]) -> dict:
    """Run every point in ``home`` (each run killed at its point, or failing for ``fails``), then a
    run with no fault, which must finish the round. Returns the killed runs' Prefect flow run ids
    and the seconds each run took."""
    timings: dict[str, float] = {}
    killed_flow_runs: list[str] = []
    for index, point in enumerate(POINTS):
        log = logs / f"run-{index:02d}-{point.replace(':', '-')}.log"
        started = time.monotonic()
        proc = _start(home, cache, point, api_url, log)
        code = proc.wait(timeout=600)
        timings[point] = round(time.monotonic() - started, 1)
        if point == "fails":
            assert code == 1 and "TrainingTimeout" in log.read_text(), log.read_text()[-4000:]
            assert json.loads((home / "data" / "tiny" / "round.json").read_text())["state"] == "failed"
            continue
        assert code == -9, f"run {index} was to die at {point!r} (SIGKILL) but exited {code}:\n" \
                           f"{log.read_text()[-4000:]}"
        if index == 0:
            after_first_kill()
        killed_flow_runs = _flow_run_ids(home)
    started = time.monotonic()
    final = subprocess.run(_command(home, cache), capture_output=True, text=True, env=_env(None, api_url),
                           cwd=REPO, timeout=600)
    timings["final"] = round(time.monotonic() - started, 1)
    assert final.returncode == 0, final.stdout[-4000:] + final.stderr[-4000:]
    return {"killed": killed_flow_runs, "seconds": timings}


def _one_writer_and_nothing_retried(home: Path, cache: Path, api_url: str) -> None:
    """While the test holds a finished home's lock a run exits at once naming the holder; after
    it, a run finds nothing new (no file of the round is retried twice)."""
    with home_lock(home):  # one writer per home: a second run exits at once, naming the holder
        busy = subprocess.run(_command(home, cache), capture_output=True, text=True,
                              env=_env(None, api_url), cwd=REPO, timeout=600)
    assert busy.returncode == 75 and f"in use by pid {os.getpid()}" in busy.stdout + busy.stderr, busy.stdout[-3000:]
    again = subprocess.run(_command(home, cache), capture_output=True, text=True, env=_env(None, api_url),
                           cwd=REPO, timeout=600)
    assert again.returncode == 0 and "no-new-data" in again.stdout + again.stderr  # nothing is retried twice


def test_a_round_killed_anywhere_ends_where_an_uninterrupted_round_ends(tmp_path, prefect_api_url, demo_cache):
    chain, ref = tmp_path / "chain", tmp_path / "reference"
    started: dict[str, subprocess.Popen] = {}

    def start_the_reference() -> None:
        # the first run built the demo base model (if no earlier test had): the reference shares it
        started["reference"] = _start(ref, demo_cache, None, prefect_api_url, tmp_path / "reference.log")

    result = _run_chain(chain, demo_cache, prefect_api_url, tmp_path, start_the_reference)
    assert started["reference"].wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-4000:]
    print("seconds per run:", result["seconds"])

    got, want = _snapshot(chain), _snapshot(ref)
    assert got["registry"] == want["registry"]  # one version per candidate, same tags, same aliases
    assert len(got["registry"]["tiny-policy"]["versions"]) == 1
    assert got["registry"]["tiny-policy"]["aliases"] == {"champion": "1", "challenger": "1"}
    assert got["ledger"] == want["ledger"] and set(got["ledger"].values()) == {"consumed"}
    assert got["files"] == want["files"] and got["landing"] == want["landing"]
    assert got["datasets"] == want["datasets"] and len(got["datasets"]) == 1 and got["settled"] and want["settled"]
    trained = {p.name.removeprefix("dpo-") for p in (chain / "runs" / "tiny").glob("dpo-*")}
    version = _client(chain).get_model_version("tiny-policy", "1")
    assert trained == {version.tags["alignflow.candidate_digest"]}  # the one candidate, registered once
    assert _open_runs(chain) == []  # every dead round's MLflow runs were closed

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        states = {run_id: client.read_flow_run(run_id).state.type.value for run_id in result["killed"]}
    assert list(states.values()).count("CRASHED") == len(POINTS) - 1, states  # all but the failed run
    assert list(states.values()).count("FAILED") == 1, states
    _one_writer_and_nothing_retried(chain, demo_cache, prefect_api_url)
