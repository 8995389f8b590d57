"""Versions that make results reproducible and caches safe: the code version of ``alignment/``
and the cache keys of pipeline stages.

A stage's cache key hashes its stage name, the inputs that determine its result (data
digests, upstream model digests, the relevant config sections) and the code version of
``alignment/``. Anything else a task receives (MLflow run ids, progress callbacks) is left
out, so a re-run with nothing new hits the cache and a code change retrains.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

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


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def digest_of(*parts: Any) -> str:
    """sha256 (16 hex) of JSON-canonical parts."""
    blob = json.dumps([_canonical(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_cache_key(*input_names: str):
    """A Prefect ``cache_key_fn`` hashing the named task inputs, the task name and the code version."""

    def key_fn(context: Any, inputs: dict[str, Any]) -> str:
        task_name = getattr(getattr(context, "task", None), "name", "task")
        picked = {name: inputs.get(name) for name in input_names}
        return f"{task_name}-{digest_of(picked, code_version())}"

    return key_fn
