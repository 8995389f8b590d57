"""Running a Triton kernel's checks under Triton's interpreter on CPU (the unit tests of
alignment.triton_attention and alignment.triton_sampling).

The interpreter is switched on by ``TRITON_INTERPRET=1`` when Triton is imported, so the checks run
in a child process with that variable set and the project root on its path. The CPU torch wheel
has no Triton: there :data:`HAS_TRITON` is False and the tests that use this skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def run_in_interpreter(script: str, timeout: float = 300) -> None:
    """Run ``script`` (Python source ending by printing ``ok``) in a child under the interpreter;
    AssertionError with the child's stderr when it fails or does not print ``ok``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
