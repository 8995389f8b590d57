"""Prefect global concurrency limits, held where they exist.

On a Prefect server, infra/bootstrap_prefect.py creates the limits ``gpu`` (slots = GPUs the
pool may use at once) and ``registry`` (one slot around "read champion, gate, register, move
aliases"). Embedded — or against a server nobody bootstrapped — no limit exists: the home lock
(tasks/lock.py) already makes a run its home's only writer, and acquiring a missing limit would
only make Prefect warn "do not exist - skipping acquisition" on every run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

GPU = "gpu"
REGISTRY = "registry"


def limit_exists(name: str) -> bool:
    """Whether the current Prefect API has a global concurrency limit called ``name``."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return False
    return True


@contextlib.contextmanager
def held(name: str, occupy: int = 1, timeout_seconds: float | None = None) -> Iterator[bool]:
    """Hold ``occupy`` slots of the limit ``name`` for the block, waiting for them (at most
    ``timeout_seconds``: then Prefect raises ``TimeoutError``), when the limit exists; otherwise
    run the block at once. Yields whether slots were held."""
    if not limit_exists(name):
        yield False
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=occupy, timeout_seconds=timeout_seconds):
        yield True
