"""Crash and resume: kill `alignflow run` (the flow process and its Prefect server) while the
policy trains; the training process dies with it; the re-run takes the finished stages from
cache and resumes training from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.pipeline_helpers import TINY, child_runs, overrides, use_store

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.fault]

ALIGNFLOW = [sys.executable, "-m", "flows.cli"]


def _run_args(home: Path, cache: Path) -> list[str]:
    extra = ["dpo.epochs=60", "dpo.batch_size=4", "dpo.save_every=2", "dpo.keep_checkpoints=2"]
    args = ["run", "--config", TINY]
    for item in overrides(home, cache, *extra):
        args += ["--set", item]
    return args


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update(OMP_NUM_THREADS="1", PREFECT_HOME=str(home / "prefect"), PYTHONUNBUFFERED="1")
    return env


def _training_alive(run_dir: Path) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(run_dir).encode() in (proc / "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


def test_killed_flow_resumes_training_and_reuses_finished_stages(tmp_path, demo_cache):
    home, cache = tmp_path / "home", demo_cache  # the session's demo base model (built by the first user)
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen([*ALIGNFLOW, *_run_args(home, cache)], stdout=log, stderr=subprocess.STDOUT,
                            env=_env(home), start_new_session=True, cwd=Path(TINY).parents[1])
    deadline = time.monotonic() + 300
    checkpoints: list[Path] = []
    while time.monotonic() < deadline and not checkpoints:
        checkpoints = list((home / "runs" / "tiny").glob("dpo-*/checkpoints/step-*"))
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.5)
    assert checkpoints, "no DPO checkpoint appeared within 300 s"
    run_dir = checkpoints[0].parents[1]
    os.killpg(proc.pid, signal.SIGKILL)  # a crash: no cleanup code runs in the flow process
    proc.wait(timeout=30)
    for _ in range(40):
        if not _training_alive(run_dir):
            break
        time.sleep(0.25)
    assert not _training_alive(run_dir), "the training process outlived the killed flow"
    assert not (run_dir / "summary.json").exists(), "training finished before the kill; make it longer"

    second = subprocess.run([*ALIGNFLOW, *_run_args(home, cache)], capture_output=True, text=True,
                            env=_env(home), timeout=600, cwd=Path(TINY).parents[1])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"], summary
    assert summary["finished"]
    assert (run_dir / "train.log").read_text().count("=== ") == 2  # launched twice: crash, resume
    reward_logs = list((home / "runs" / "tiny").glob("reward-*/train.log"))
    assert len(reward_logs) == 1 and reward_logs[0].read_text().count("=== ") == 1  # trained once
    client = use_store(home)
    experiment = client.get_experiment_by_name("tiny")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`prefect.flow_run_id` != ''",
                                 order_by=["attributes.start_time DESC"])
    latest = child_runs(client, parents[0].info.run_id)
    assert "reward" not in latest and "preferences" not in latest  # came from Prefect's cache
    assert "dpo" in latest and latest["dpo"][0].info.status == "FINISHED"
