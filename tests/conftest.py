"""Test-session settings shared by every test.

Tiny models are dominated by per-op overhead, so one intra-op thread is faster than two and
keeps parallel test processes (training subprocesses included, through OMP_NUM_THREADS) from
fighting over the 2 CI cores.

Session fixtures shared by tests/fault and tests/integration: one Prefect test server for the
whole session (starting one costs ~12 s; the fault tests had one each) and one demo base-model
cache (building it costs ~8 s; every pipeline test, the fault tests included, only reads it once
built). Under ``make test``'s pytest-xdist workers each worker has its own.

Test order: modules with fault tests first, then the real-server module, then other slow
modules, then the rest (collection order within each), so that the workers start the
longest tests first and finish together (longest-first scheduling; idle workers steal queued tests).
"""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import torch  # noqa: E402

torch.set_num_threads(1)


def _module_rank(item: pytest.Item) -> int:
    for rank, marker in enumerate(("fault", "server", "slow")):
        if item.get_closest_marker(marker):
            return rank
    return 3


def pytest_collection_modifyitems(config, items):
    """Longest first (see the module docstring); a module's tests stay together."""
    rank: dict = {}
    for item in items:
        rank[item.path] = min(rank.get(item.path, 3), _module_rank(item))
    items.sort(key=lambda item: rank[item.path])  # stable: collection order within a rank


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A temporary Prefect API + SQLite database for the whole session."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api_url(prefect_harness) -> str:
    """The session's Prefect API, for CLI subprocesses (a killed run's flow run stays in it)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """Demo corpus + tiny base model cache, built once per session by the first pipeline run."""
    return tmp_path_factory.mktemp("demo-cache")
