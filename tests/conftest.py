"""Test set-up: one local Ray per session, multi-node clusters last, token auth on purpose."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.s3_server"]  # the s3_server and s3_uri fixtures (an S3 API on loopback)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
TESTS_RUNTIME_ENV = {"env_vars": {"PYTHONPATH": os.pathsep.join([REPO_DIR, TESTS_DIR])}}
"""Workers import the test modules by name (``tests.test_x``), as the driver does, to unpickle
the functions the tests map."""

# Ray's newer releases default to token authentication; the suite runs with it on, deliberately.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Metrics reach Ray's Prometheus endpoint within a second (default: 10 s); tests/test_metrics.py.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "stops_heads: tests that stop the session's heads; they "
                            "run last of the heads tests, so no other needs the heads restarted")


def pytest_collection_modifyitems(items: list) -> None:
    """Run tests that start their own Ray clusters after those that share the session's Ray, and
    just before them the tests that use the session's Ray heads (`heads`), together, those that
    stop heads (`stops_heads`) last."""
    items.sort(key=lambda item: (item.get_closest_marker("multinode") is not None,
                                 item.get_closest_marker("heads") is not None,
                                 item.get_closest_marker("stops_heads") is not None))


_SESSION_HEADS: list = []
"""The `heads` of the session, once a test asked for them."""


def pytest_runtest_teardown(item, nextitem) -> None:
    """Stop the session's heads after the last test that uses them."""
    if (_SESSION_HEADS and item.get_closest_marker("heads") is not None
            and (nextitem is None or nextitem.get_closest_marker("heads") is None)):
        _SESSION_HEADS[0].stop()


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


@pytest.fixture(scope="session")
def heads():
    """Ray heads shared by the tests marked ``heads``, started as they ask (see
    tests/ray_head.py) and stopped after the last of them."""
    from tests.ray_head import Heads

    heads = Heads()
    _SESSION_HEADS.append(heads)
    try:
        yield heads
    finally:
        heads.stop()
