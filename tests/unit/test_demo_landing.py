"""A simulated batch lands whole: the simulator process SIGKILLed at each point of its landing,
then settled by ``finish_landing`` (what the demo and ``make run``'s round do first), leaves the
landing folder byte for byte as an uninterrupted run does, with the report beside it; killed
before its report, nothing has landed and the staged files are dropped (tasks/demo/staging.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tasks.demo.staging import finish_landing

ROOT = Path(__file__).resolve().parents[2]

SIMULATE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tasks.demo import simulator
    from tasks.demo.settings import SimulatorSettings
    from tests.unit.test_demo_sample_floor import PROMPTS, fake_sampler

    simulator.sample_responses = fake_sampler(0.7, [])
    settings = SimulatorSettings(prompts_per_batch=20, samples_per_prompt=4, malformed_share=0.1, rows_per_file=15)
    out = Path(sys.argv[1])
    simulator.simulate_feedback("unused", PROMPTS, settings, out / "land", batch_id="round000-x",
                                report_dir=out / "sim", seed=3)
""")


def simulate(out: Path, fault: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_FAULT"}
    if fault:
        env["ALIGNFLOW_FAULT"] = fault
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", SIMULATE, str(out)], cwd=ROOT, env=env, timeout=120).returncode


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def report(out: Path) -> dict:
    """The batch's report without what differs between two runs (its folder, the seconds it took)."""
    found = json.loads((out / "sim" / "report-round000-x.json").read_text())
    found["files"] = [Path(f).relative_to(out).as_posix() for f in found["files"]]
    return {k: v for k, v in found.items() if k != "seconds"}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    assert simulate(out) == 0
    assert len(files(out / "land")) >= 3 and not (out / "sim" / "staging" / "round000-x").exists()
    return out


@pytest.mark.parametrize("fault", ["land:simulated-file", "simulate:before-landing"])
def test_killed_after_its_report_the_batch_lands_whole(tmp_path, whole, fault):
    assert simulate(tmp_path, fault) == -signal.SIGKILL
    landed = files(tmp_path / "land")
    assert len(landed) == (1 if fault == "land:simulated-file" else 0)  # cut short: no whole batch yet
    assert (tmp_path / "sim" / "report-round000-x.json").is_file()
    assert finish_landing(tmp_path / "sim", tmp_path / "land") == ["round000-x"]
    assert files(tmp_path / "land") == files(whole / "land")
    assert report(tmp_path) == report(whole)  # report and truth as the uninterrupted run's
    assert files(tmp_path / "sim")["truth-round000-x.parquet"] == files(whole / "sim")["truth-round000-x.parquet"]
    assert not (tmp_path / "sim" / "staging" / "round000-x").exists()
    assert finish_landing(tmp_path / "sim", tmp_path / "land") == []  # settled once


def test_killed_before_its_report_nothing_lands_and_the_batch_runs_again(tmp_path, whole):
    assert simulate(tmp_path, "simulate:before-report") == -signal.SIGKILL
    assert files(tmp_path / "land") == {} and not (tmp_path / "sim" / "report-round000-x.json").exists()
    assert any((tmp_path / "sim" / "staging" / "round000-x").iterdir())  # written, never landed
    assert finish_landing(tmp_path / "sim", tmp_path / "land") == []
    assert not (tmp_path / "sim" / "staging" / "round000-x").exists()
    assert simulate(tmp_path) == 0  # the round simulates its batch again
    assert files(tmp_path / "land") == files(whole / "land")
