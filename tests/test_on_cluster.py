"""``rm.mapper(..., on_cluster=True)``: the pool and the dispatch loop run in a host actor on the
head node; every verb behaves as with the mapper on the driver, errors included (the verbs'
promises on every backend, errors, cancel and broadcast among them: tests/test_verbs.py).

Over Ray Client, and with a driver killed mid-map, see tests/test_ray_client.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray

import rhmapper as rm
from rhmapper import _ray_compat
from rhmapper import host_driver
from tests.ray_head import wait_until


def square(x):
    return x * x


def logged_naps(x, log):
    with open(log, "a") as file:  # one line per item started, appended by the replicas
        file.write(f"{x}\n")
    time.sleep(x)
    return x


class Counter:
    def __init__(self) -> None:
        self.total = 0

    def add(self, amount):
        self.total += amount
        return self.total


@pytest.fixture
def on_cluster(ray_local):
    with rm.mapper(square, replicas=2, env=rm.Env(compute={"CPU": 0.5}), on_cluster=True) as m:
        yield m


def test_every_verb_runs_on_the_host(on_cluster):
    m = on_cluster
    assert m.wait_ready(timeout=120) is m and m.num_replicas == 2
    assert m.map(range(50)) == [x * x for x in range(50)]
    assert m.map(range(200), batch_size=1) == [x * x for x in range(200)]
    assert m.starmap([(2,), (3,)]) == [4, 9]
    assert list(m.imap(range(100), window=8)) == [x * x for x in range(100)]
    assert sorted(m.imap_unordered(range(30))) == sorted(x * x for x in range(30))
    assert m.call(12) == 144
    assert m.map([]) == []
    m.add_replicas(1)
    assert len(m.replica_names) == 3 and all(name.startswith("square_") for name in m.replica_names)
    assert [type(handle).__name__ for handle in m.replicas] == ["ActorHandle"] * 3
    m.drop_replicas(2)
    assert m.num_replicas == 1
    assert m.map(range(10)) == [x * x for x in range(10)]


def test_host_runs_on_the_head_node_with_no_resources(on_cluster):
    """(On a cluster of several nodes: tests/test_spillover.py.)"""
    host = on_cluster._backend.host
    node, resources = ray.get(host.__ray_call__.remote(lambda self: (
        ray.get_runtime_context().get_node_id(),
        ray.get_runtime_context().get_assigned_resources())))
    assert node == _ray_compat.head_node_id(ray.nodes())
    assert "CPU" not in resources, resources
    assert on_cluster.map([4]) == [16]


def test_timeout_ends_the_item(ray_local, tmp_path):
    """(Cancel, user errors and broadcast with the mapper on the cluster: tests/test_verbs.py.)"""
    log = tmp_path / "started.log"
    with rm.mapper(logged_naps, replicas=1, on_cluster=True) as m:
        values = m.map([0.0, 5.0, 0.0], timeout=1.0, return_exceptions=True, batch_size=1,
                       kwargs={"log": str(log)})
        assert values[0] == 0.0 and values[2] == 0.0 and isinstance(values[1], TimeoutError)


def test_shutdown_ends_the_host_and_its_replicas(ray_local):
    m = rm.mapper(square, replicas=1, on_cluster=True)
    host, replica = m._backend.host, m.replicas[0]
    assert m.map([3]) == [9]
    m.shutdown()
    for actor in (host, replica):
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_call__.remote(lambda self: 1), timeout=30)


def test_spawned_map_is_found_by_name_and_kept_until_collected(ray_local):
    with rm.mapper(square, replicas=2, on_cluster=True) as m:
        spawned = m.spawn_map(range(100), name="test_spawned_squares", batch_size=1)
        assert rm.get_map("test_spawned_squares").iter_results(delete=False).__next__() == 0
        assert spawned.results(delete=False) == [x * x for x in range(100)]
        status = rm.get_map("test_spawned_squares").status()
        assert status == rm.MapStatus(100, 100, 0, "done")
        counted = status.stats  # as m.stats() shows a running map: one call per item here
        assert (counted.done, counted.calls, counted.in_flight, counted.retried) == (100, 100, 0, 0)
        assert counted.p50_call_seconds <= counted.p99_call_seconds
        with pytest.raises(ValueError, match="already exists"):
            m.spawn_map([1], name="test_spawned_squares")
        assert rm.get_map("test_spawned_squares").results() == [x * x for x in range(100)]
        with pytest.raises(KeyError, match="no spawned map named 'test_spawned_squares'"):
            rm.get_map("test_spawned_squares")


def test_spawned_map_reports_failure_and_cancel(ray_local, tmp_path):
    log = tmp_path / "started.log"
    with rm.mapper(logged_naps, replicas=1, on_cluster=True) as m:
        spawned = m.spawn_map([0.0, 0.0, "x"], name="test_spawned_fails", kwargs={"log": str(log)})
        with pytest.raises(TypeError):
            spawned.results()
        assert spawned.status().state == "failed"
        spawned.delete()
        log.write_text("")
        slow = m.spawn_map([2.0, 2.1, 2.2, 2.3, 2.4], name="test_spawned_cancel", batch_size=1,
                           kwargs={"log": str(log)})
        deadline = time.monotonic() + 30
        while slow.status().stats.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        running = slow.status().stats  # one call running, one queued behind it on the replica
        assert running.map_id > 0 and running.in_flight >= 1 and running.done == 0
        slow.cancel()
        with pytest.raises(rm.MapCancelledError):
            slow.results()
        assert slow.status().state == "cancelled" and slow.status().done < 5
        slow.delete()
        time.sleep(2.5)  # a running item has ended: a queued one would have started by now
    assert log.read_text().split() in ([], ["2.0"]), "no item queued behind the cancel started"


def test_spawned_map_expires_and_is_bounded_in_size(ray_local):
    with rm.mapper(square, replicas=1, on_cluster=True) as m:
        short = m.spawn_map(range(10), name="test_spawned_expires", keep_seconds=0.5)
        assert short.results(delete=False) == [x * x for x in range(10)]
        assert wait_until(lambda: not spawned_exists("test_spawned_expires"), seconds=30), \
            "a finished map is dropped keep_seconds after it ended (looked at every 5 s)"
        big = m.spawn_map(range(1000), name="test_spawned_too_big", max_result_bytes=1000)
        with pytest.raises(rm.RhmapperError, match="outgrew max_result_bytes=1000"):
            big.results(delete=False)
        assert big.status().state == "failed"
        big.delete()


def test_a_spawned_map_whose_inputs_cannot_all_be_sent_is_deleted(ray_local, monkeypatch):
    monkeypatch.setattr(host_driver, "START_ALL_BYTES", 0)  # inputs go in chunks, not with the start
    with rm.mapper(square, replicas=1, on_cluster=True) as m:
        with pytest.raises(TypeError, match="lock"):
            m.spawn_map(list(range(100)) + [threading.Lock()], name="test_spawned_unsendable")
        assert not spawned_exists("test_spawned_unsendable"), "no map runs on part of its inputs"


def spawned_exists(name):
    try:
        rm.get_map(name)
    except KeyError:
        return False
    return True


def test_spawn_map_needs_the_mapper_on_the_cluster(ray_local):
    with rm.mapper(square, replicas=0) as m:
        with pytest.raises(rm.RhmapperError, match="on_cluster=True"):
            m.spawn_map([1], name="x")


def test_your_actors_join_a_mapper_on_the_cluster(ray_local):
    actors = [ray.remote(Counter).options(num_cpus=0.1).remote() for _ in range(2)]
    with rm.mapper(Counter, method="add", replicas=actors, on_cluster=True) as m:
        m.wait_ready(timeout=120)
        values = m.map([1] * 6, batch_size=1)
        assert set(m.replicas) == set(actors)
    totals = ray.get([actor.add.remote(0) for actor in actors])  # alive after shutdown
    assert sum(totals) == 6
    assert sorted(values) == sorted(n for total in totals for n in range(1, total + 1))
