"""tasks/stages/slots.py against a real Prefect API (the session's test server): a limit that
exists is held and queues a second holder; one that does not exist is skipped without Prefect's
"do not exist - skipping acquisition" warning, which embedded runs used to print every time."""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from pathlib import Path

import pytest

from tasks.stages import slots

REPO = Path(__file__).resolve().parents[2]


def test_a_missing_limit_is_skipped_quietly(prefect_harness, caplog):
    caplog.set_level(logging.DEBUG)
    with slots.held("no-such-limit-19") as got:
        pass
    assert got is False
    assert not [r for r in caplog.records if "do not exist" in r.getMessage()]


def test_an_existing_limit_is_held_and_queues_the_next_holder(prefect_harness):
    from prefect.client.orchestration import get_client

    name = "slots-test-registry"
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)
    try:
        assert slots.limit_exists(name)
        inside, release = threading.Event(), threading.Event()

        def first() -> None:
            with slots.held(name) as got:
                assert got is True
                inside.set()
                release.wait(30)

        holder = threading.Thread(target=first)
        holder.start()
        assert inside.wait(30)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            with slots.held(name, timeout_seconds=2):
                pass
        assert time.monotonic() - started >= 1.5  # it waited for the slot, then gave up
        release.set()
        holder.join(30)
        with slots.held(name, timeout_seconds=30) as got:  # free again
            assert got is True
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name(name)


def test_the_names_are_the_ones_the_bootstrap_script_creates():
    spec = importlib.util.spec_from_file_location("bootstrap_prefect", REPO / "infra" / "bootstrap_prefect.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    assert (bootstrap.GPU_LIMIT, bootstrap.REGISTRY_LIMIT) == (slots.GPU, slots.REGISTRY)
