"""Running a recipe by hand in a test: what several recipe tests do around its training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def train_between_evaluations(recipe, inspect: Callable[[Any], None] | None = None) -> tuple[dict, dict]:
    """Set ``recipe`` up, evaluate it, train it, save it and release it; return its evaluation
    metrics before and after training. ``inspect(recipe)`` runs after the set-up (its models are
    built then). Asserts that training finished."""
    try:
        recipe.setup()
        if inspect is not None:
            inspect(recipe)
        before = recipe.evaluate()
        assert recipe.train()
        after = recipe.last_eval
        recipe.save()
    finally:
        recipe.cleanup()
    return before, after
