"""The top-level package names: a foreign ``tasks`` package shadowing alignflow's is refused loudly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _import_flows(extra_path: Path | None) -> subprocess.CompletedProcess:
    paths = ([str(extra_path)] if extra_path else []) + [str(REPO)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-c", "import flows.commands"], env=env, cwd=extra_path or REPO,
                          capture_output=True, text=True, timeout=120)


def test_flows_imports_with_its_own_packages():
    assert _import_flows(None).returncode == 0


def test_a_foreign_tasks_package_first_on_the_path_is_named(tmp_path):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("# another distribution's tasks package\n")
    done = _import_flows(tmp_path)
    assert done.returncode != 0
    assert "is not alignflow's" in done.stderr and str(tmp_path) in done.stderr
