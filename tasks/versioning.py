"""Versions that make results reproducible and caches safe: the code version of ``alignment/``,
the checkout's commit, and :func:`digest_of`, the one sha256-of-JSON digest of configs and
records (stage cache keys are built from it in :mod:`tasks.stages.cached`).
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from alignment.config import json_digest

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 (12 hex) over the source files of ``alignment/`` (path + content, sorted)."""
    digest = hashlib.sha256()
    for path in sorted((PACKAGE_ROOT / "alignment").rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit, when it is a git checkout with git installed."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def digest_of(*parts: Any) -> str:
    """:func:`alignment.config.json_digest` of the parts (as a list)."""
    return json_digest(list(parts))
