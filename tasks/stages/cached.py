"""A cached stage: a plain stage function made a Prefect task cached on a key of its inputs.

A stage is written once, as an ordinary function (usable without Prefect, e.g. from
benchmarks); :func:`cached_stage` wraps it into a task whose cache key is its ``key`` function
of the same arguments, prefixed by the task name and followed by the code version of
``alignment/`` (:func:`tasks.versioning.code_version`), so a code change recomputes it.
Anything the key function ignores (MLflow run ids, progress callbacks) does not split the cache.

:func:`run_cached` calls such a task and, when a cached record's files are gone (a cleaned
home, a moved run folder), runs it again with the cache refreshed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefect import Task, task

from tasks.results import cached_records
from tasks.versioning import code_version, digest_of

R = TypeVar("R")


def cached_stage(name: str, key: Callable[..., Any], **options: Any) -> Callable[[Callable[..., R]], Task[..., R]]:
    """Decorator: ``fn`` as a Prefect task named ``name``, cached on ``key(**arguments)``.

    ``key`` takes the stage's arguments by name (extra ones through ``**_``) and returns
    anything :func:`~tasks.versioning.digest_of` can hash. ``options`` go to ``prefect.task``
    (``task_run_name``, ``retries``, ...). The result is persisted as a JSON record
    (:func:`tasks.results.cached_records`), so a cache hit hands the same record on."""

    def key_fn(context: Any, inputs: dict[str, Any]) -> str:
        cfg = inputs.get("cfg")  # records name files under <home>/.../<pipeline>: never shared across them
        scope = (cfg.pipeline.name, str(cfg.home)) if cfg is not None else None
        return f"{name}-{digest_of(key(**inputs), scope, code_version())}"

    def decorate(fn: Callable[..., R]) -> Task[..., R]:
        return task(name=name, **cached_records(key_fn), **options)(fn)  # JSON records, never pickles

    return decorate


def run_cached(stage: Task[..., R], present: Callable[[R], bool] | None, /, **arguments: Any) -> tuple[R, bool]:
    """Run a cached stage; re-run it with a refreshed cache when ``present(record)`` is false
    (None: a record is always usable, it names no files).

    Returns (record, came_from_cache). Raises what the stage raises."""
    state = stage(**arguments, return_state=True)
    record = state.result()
    if present is not None and not present(record):
        state = stage.with_options(refresh_cache=True)(**arguments, return_state=True)
        record = state.result()
    return record, state.name == "Cached"
