"""A class defined in the driver's ``__main__`` stays the driver's own class on every path back
to the driver: ``except MyError`` catches the error a replica raised, an exception returned with
``return_exceptions=True`` is an instance of ``MyError``, and a returned ``Point`` is an
instance of the driver's ``Point``; on a driver joined to a cluster (auto replicas, over compiled
graphs, your actors), over Ray Client, with the mapper on the cluster (maps and spawned maps),
and over two clusters.

Each case runs a driver *script* (``python -c``, so that its classes live in its ``__main__``)
against test heads of its own on loopback (``tests/ray_head.py``), stopped by pid. Ray ships
those classes by value with its own copy of cloudpickle; a replica's values and errors must
travel back with the same copy, whose class registry maps them to the driver's classes (see
``rhmapper.wire.use_by_value_pickler``).
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.driver_process import DriverProcess

pytestmark = [pytest.mark.slow, pytest.mark.heads]

DRIVER = """
    import json, sys, uuid
    import ray
    import rhmapper as rm

    class MyError(Exception):
        pass

    class Point:
        def __init__(self, x):
            self.x = x

    def point_or_error(x):
        if x < 0:
            raise MyError(Point(x))  # the error carries a value of a __main__ class too
        return Point(x)

    class Holder:  # the user's actor, its batches run through __ray_call__
        def get(self, x):
            return point_or_error(x)

    def kind(value):
        \"\"\"What ``value`` is to this driver: its own Point / MyError, or a stranger.\"\"\"
        if isinstance(value, Point):
            return f"Point({value.x})"
        if isinstance(value, MyError):
            return f"MyError({kind(value.args[0])})"
        return f"stranger {type(value).__module__}.{type(value).__qualname__}: {value!r}"

    def raised(run):
        try:
            run()
        except MyError as error:
            return kind(error)
        except BaseException as error:
            return f"not caught by except MyError: {kind(error)}"
        return "nothing raised"

    def check(m):
        return {"values": [kind(v) for v in m.map([0, 1, 2])],
                "streamed": [kind(v) for v in m.imap([3, 4], batch_size=1)],
                "raised": raised(lambda: m.map([1, -2, 3])),
                "returned": [kind(v) for v in m.map([5, -6], return_exceptions=True)]}

    def check_spawned(m):
        name = f"class_identity_{uuid.uuid4().hex[:8]}"
        good = m.spawn_map([7, 8], name=name + "_good").results()
        bad = m.spawn_map([9, -10], name=name + "_bad")
        returned = m.spawn_map([11, -12], name=name + "_returned", return_exceptions=True)
        report = {"values": [kind(v) for v in good], "raised": raised(bad.results),
                  "returned": [kind(v) for v in returned.results()]}
        bad.delete()  # results() that raised kept it, and with it the host: the head is shared
        return report

    mode, addresses = sys.argv[1], sys.argv[2:]
    env = rm.Env(compute={"CPU": 0.25})
    report = {}
    if mode == "multi":
        with rm.mapper(point_or_error, replicas={addresses[0]: 1, addresses[1]: 1}, env=env) as m:
            report["mapper"] = check(m)
    else:
        ray.init(address=addresses[0])
        with rm.mapper(point_or_error, replicas=1, env=env) as m:
            report["mapper"] = check(m)
        if mode == "client":
            with rm.mapper(point_or_error, replicas=1, env=env, on_cluster=True) as m:
                report["on the cluster"] = check(m)
                report["spawned"] = check_spawned(m)
        if mode == "joined":
            with rm.mapper(point_or_error, replicas=1, env=env, compiled_graphs=True) as m:
                report["compiled graphs"] = check(m)
            holder = ray.remote(Holder).options(num_cpus=0.25).remote()
            with rm.mapper(Holder, method="get", replicas=[holder]) as m:
                report["your actors"] = check(m)
    print(json.dumps(report))
"""

EXPECTED = {"values": ["Point(0)", "Point(1)", "Point(2)"], "streamed": ["Point(3)", "Point(4)"],
            "raised": "MyError(Point(-2))", "returned": ["Point(5)", "MyError(Point(-6))"]}
EXPECTED_SPAWNED = {"values": ["Point(7)", "Point(8)"], "raised": "MyError(Point(-10))",
                    "returned": ["Point(11)", "MyError(Point(-12))"]}


def run_driver(mode: str, env: dict[str, str], *addresses: str) -> dict:
    driver = DriverProcess(textwrap.dedent(DRIVER), env, mode, *addresses)
    try:
        return json.loads(driver.finish(timeout=150))
    finally:
        driver.kill()


@pytest.mark.timeout(240)
def test_a_mapper_over_two_clusters_returns_the_drivers_own_classes(heads):
    a, b = heads.live(2)  # first of the heads tests: both heads start side by side
    report = run_driver("multi", a.driver_env(), a.client_address, b.client_address)
    assert report == {"mapper": EXPECTED}


@pytest.mark.timeout(240)
def test_a_driver_joined_to_the_cluster_gets_its_own_classes(heads):
    (head,) = heads.live(1)
    report = run_driver("joined", head.driver_env(), head.gcs_address)
    assert report == {"mapper": EXPECTED, "compiled graphs": EXPECTED, "your actors": EXPECTED}


@pytest.mark.timeout(240)
def test_a_ray_client_driver_gets_its_own_classes_also_from_a_mapper_on_the_cluster(heads):
    """One Ray Client driver (one connection for both cases): a mapper of its own, then one on
    the cluster (maps and spawned maps)."""
    (head,) = heads.live(1)
    report = run_driver("client", head.driver_env(), head.client_address)
    assert report == {"mapper": EXPECTED, "on the cluster": EXPECTED, "spawned": EXPECTED_SPAWNED}
