"""Test set-up: one local Ray per session, multi-node clusters last, token auth on purpose."""

from __future__ import annotations

import os

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
TESTS_RUNTIME_ENV = {"env_vars": {"PYTHONPATH": os.pathsep.join([REPO_DIR, TESTS_DIR])}}
"""Workers import the test modules by name (``tests.test_x``), as the driver does, to unpickle
the functions the tests map."""

# Ray's newer releases default to token authentication; the suite runs with it on, deliberately.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(items: list) -> None:
    """Run tests that start their own Ray clusters after those that share the session's Ray."""
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)


@pytest.fixture(scope="session")
def ray_session():
    """The session's local Ray: 4 logical CPUs on this 2-core machine."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 namespace="rhmapper-tests", runtime_env=TESTS_RUNTIME_ENV)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_local(ray_session):
    """Ray for one test; fails loudly if a multi-node test left it shut down."""
    assert ray_session.is_initialized(), "a multi-node test ran before a local-Ray test"
    return ray_session


@pytest.fixture
def head():
    """A Ray head of the test's own on loopback (see tests/ray_head.py), stopped by pid after."""
    from tests.ray_head import start_head

    head = start_head(num_cpus=2)
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def heads():
    """Ray heads of the module's own, started as its tests ask (see tests/ray_head.py)."""
    from tests.ray_head import Heads

    heads = Heads()
    try:
        yield heads
    finally:
        heads.stop()
