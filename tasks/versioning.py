"""Versions that make results reproducible and caches safe: the code version of ``alignment/``
(whole, and the part one training recipe runs), the checkout's commit, and :func:`digest_of`, the
one sha256-of-JSON digest of configs and records (stage cache keys are built from it in
:mod:`tasks.stages.cached`).
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from alignment.config import json_digest
from alignment.recipes import RECIPES

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 (12 hex) over the source files of ``alignment/`` (:func:`_sources_digest`)."""
    return _sources_digest((PACKAGE_ROOT / "alignment").rglob("*.py"))


def _sources_digest(paths) -> str:
    """sha256 (12 hex) over source files: path under the package root + content, sorted by path."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _source(module: str) -> Path | None:
    """The file of ``module`` under the package root (a package's ``__init__.py``), or None."""
    base = PACKAGE_ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(module: str, path: Path) -> set[str]:
    """Every ``alignment`` name ``module`` imports anywhere in its file (top level or inside a
    function), as written: ``from a.b import c`` gives ``a.b`` and ``a.b.c`` (c may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package upwards
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "alignment" or n.startswith("alignment.")}


@cache
def recipe_code_version(recipe: str) -> str:
    """sha256 (12 hex) over the sources of ``alignment/`` that a ``recipe`` training run imports:
    the launcher's entry point (``alignment.train``), the recipe's module (:data:`alignment.recipes.RECIPES`)
    and every ``alignment`` module they import, transitively (found in the source, imports inside
    functions included), with the packages above each. A change to code the recipe never imports
    (the GPU decode kernels for a reward model, say) leaves its trained models' caches valid.
    Imports by string are not followed: the recipe table's (its entry for ``recipe`` is the root)
    and the RL rollout's user reward functions (outside ``alignment/``). Raises KeyError for an
    unknown recipe."""
    todo = ["alignment.train", RECIPES[recipe].split(":")[0]]
    files: dict[str, Path] = {}
    while todo:
        module = todo.pop()
        if module in files or (path := _source(module)) is None:
            continue  # seen, or a name imported from a module rather than a module
        files[module] = path
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
        todo += sorted(_imported(module, path))
    return _sources_digest(files.values())


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
