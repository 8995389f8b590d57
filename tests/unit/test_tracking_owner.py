"""One owner for MLflow: only tasks/tracking imports it (and the pyfunc model files MLflow loads)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ALLOWED = ("tasks/tracking/", "tasks/serving/")
"""tasks/serving holds the models-from-code files MLflow itself loads to serve a registered model."""


def _imports_mlflow(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
            return True
    return False


def test_only_the_tracking_package_imports_mlflow():
    offenders = [str(p.relative_to(REPO)) for folder in ("alignment", "tasks", "flows")
                 for p in sorted((REPO / folder).rglob("*.py"))
                 if not str(p.relative_to(REPO)).startswith(ALLOWED) and _imports_mlflow(p)]
    assert offenders == []
