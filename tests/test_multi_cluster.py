"""One mapper over replicas on two Ray clusters (``replicas={"ray://a": n, "ray://b": m}``): both
clusters do work in one map (with constant keyword arguments put on each), your actors created
under ``m.connection(address)`` join (one from a connection of your own is refused, saying so),
a cluster whose replicas cannot start does not fail a map the other can run, a replacement in
progress does not make a map see an empty pool, and when one cluster's head
is stopped mid-map the map completes on the other, every result once.

Two independent heads on loopback (``tests/ray_head.py``: own ports, own temp dirs, Ray Client
servers), stopped by pid; the driver runs in a subprocess connected to both. The heads are the
session's (the ``heads`` fixture); the tests that stop them are marked ``stops_heads`` and run after
every other test that uses them, so the heads are started again only for those.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.driver_process import DriverProcess
from tests.ray_head import stop_heads

pytestmark = [pytest.mark.slow, pytest.mark.heads]


BOTH_CLUSTERS = """
    import json, sys, time
    import ray
    import rhmapper as rm

    a, b = sys.argv[1:3]

    def tagged(x, factor):
        if factor == 0:
            time.sleep(x)
        return x * factor, ray.get_runtime_context().get_node_id()

    class Tagger:
        def __init__(self):
            self.calls = 0

        def tag(self, x):
            self.calls += 1
            return x, ray.get_runtime_context().get_node_id()

        def calls_made(self):
            return self.calls

        def node(self):
            return ray.get_runtime_context().get_node_id()

    m = rm.mapper(tagged, replicas={a: 2, b: 1}, env=rm.Env(compute={"CPU": 0.5}))
    m.wait_ready(timeout=120)
    one_per_call = m.map(range(60), batch_size=1, kwargs={"factor": 3})
    batched = m.map(range(3000), kwargs={"factor": 3})
    # The call running longest, and its stack taken on its own cluster: the map runs in a
    # thread of its own until the long item (sent last) has run a second, then is cancelled.
    import threading
    def slow_map():
        try:
            m.map([0.0] * 6 + [30.0], batch_size=1, kwargs={"factor": 0})
        except rm.MapCancelledError:
            pass
    mapping = threading.Thread(target=slow_map)
    mapping.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not [
            call for call in m.diagnose(limit=1, stacks=False).calls
            if call.first_item == 6 and call.seconds > 1]:
        time.sleep(0.2)
    diagnosis = m.diagnose(limit=1)
    m.cancel()
    mapping.join(60)
    [longest] = diagnosis.calls
    stack = diagnosis.stacks[(longest.node_id, longest.pid)]
    m.shutdown()
    # Your actors, created under the mapper's connection to each cluster, join it.
    users = rm.mapper(Tagger, method="tag", replicas={a: 0, b: 0})
    handles, node_of = [], {}
    for address in users.clusters:
        with users.connection(address):
            handles.append(ray.remote(Tagger).options(num_cpus=0.1).remote())
            node_of[address] = ray.get(handles[-1].node.remote())
    # One created over a connection of your own to cluster a is refused, saying what to do.
    with ray.init(a, allow_multiple=True, log_to_driver=False):
        mine = ray.remote(Tagger).options(num_cpus=0.1).remote()
    try:
        users.add_replicas([mine])
        refused = None
    except ValueError as error:
        refused = str(error)
    users.add_replicas(handles)
    users.wait_ready(timeout=120)
    from_users = users.map(range(20), batch_size=1)
    calls = dict(zip(users.clusters, users.broadcast("calls_made")))  # counted in each actor
    broadcast = users.broadcast("tag", 1)
    import asyncio
    async def asynchronously():  # the async verbs over both clusters, on one event loop
        return (await users.abroadcast("tag", 2), await users.amap(range(30), batch_size=1),
                [r async for r in users.aimap(range(10), window=3)],
                await asyncio.gather(*(users.acall(x) for x in range(40))))
    abroadcast, amapped, aimapped, acalled = asyncio.run(asynchronously())
    cluster_of = {node: address for address, node in node_of.items()}
    def per_cluster(tagged_values):
        return {address: sum(1 for _, node in tagged_values if cluster_of.get(node) == address)
                for address in node_of}
    print(json.dumps({"values": [v for v, _ in one_per_call], "per_cluster": per_cluster(one_per_call),
                      "batched": [v for v, _ in batched], "batched_per_cluster": per_cluster(batched),
                      "user_values": [v for v, _ in from_users],
                      "user_per_cluster": per_cluster(from_users),
                      "broadcast_per_cluster": per_cluster(broadcast),
                      "broadcast_values": [v for v, _ in broadcast], "refused": refused,
                      "calls": calls, "longest": longest.first_item, "stack": stack,
                      "abroadcast_per_cluster": per_cluster(abroadcast),
                      "abroadcast_values": [v for v, _ in abroadcast],
                      "amap_per_cluster": per_cluster(amapped + acalled),
                      "amap": [v for v, _ in amapped], "aimap": [v for v, _ in aimapped],
                      "acall": [v for v, _ in acalled]}))
"""


def start_driver(script: str, env: dict[str, str], *args: str) -> DriverProcess:
    return DriverProcess(textwrap.dedent(script), env, *args)


def run_on_both(heads, script: str) -> dict:
    """Run ``script`` as a driver given both heads' Ray Client addresses; its JSON output."""
    a, b = heads.live(2)
    driver = start_driver(script, a.driver_env(), a.client_address, b.client_address)
    return json.loads(driver.finish(timeout=240))


@pytest.mark.timeout(300)
def test_one_map_spreads_over_both_clusters(heads):
    result = run_on_both(heads, BOTH_CLUSTERS)
    a, b = heads.live(2)
    assert result["values"] == [3 * x for x in range(60)]
    assert result["batched"] == [3 * x for x in range(3000)]
    assert result["user_values"] == list(range(20))
    for counts in ("per_cluster", "batched_per_cluster", "user_per_cluster"):
        per_cluster = result[counts]
        assert sorted(per_cluster) == sorted([a.client_address, b.client_address]), per_cluster
        assert all(count > 0 for count in per_cluster.values()), f"both clusters did work: {counts}"
    assert sum(result["per_cluster"].values()) == 60, "every item ran on one of the two clusters"
    assert result["broadcast_values"] == [1, 1]
    assert sorted(result["broadcast_per_cluster"].values()) == [1, 1], "one actor per cluster"
    assert result["abroadcast_values"] == [2, 2]
    assert sorted(result["abroadcast_per_cluster"].values()) == [1, 1], "one actor per cluster"
    assert result["amap"] == list(range(30)) and result["aimap"] == list(range(10))
    assert result["acall"] == list(range(40))
    assert all(count > 0 for count in result["amap_per_cluster"].values()), result
    assert result["calls"] == result["user_per_cluster"], "each actor ran its cluster's calls"
    assert "was not created over one of this mapper's cluster connections" in result["refused"]
    assert "with m.connection(address):" in result["refused"], result["refused"]
    assert result["longest"] == 6  # the 30-s item, its stack read by py-spy on its cluster
    assert "tagged (" in result["stack"] and "batch_runner.py" in result["stack"], result["stack"]


ONE_CLUSTER_CANNOT_START = """
    import json, sys, time
    import rhmapper as rm

    a, b = sys.argv[1:3]

    class Triple:
        def __init__(self):
            time.sleep(2)  # so that no replica is ready yet when the map starts

        def triple(self, x):
            return 3 * x

    # 1.5 of b's 2 CPUs taken: a replica of 1 CPU fits b's node, but is never placed.
    blocker = rm.mapper(abs, replicas={b: 1}, env=rm.Env(compute={"CPU": 1.5}))
    blocker.wait_ready(timeout=120)
    m = rm.mapper(Triple, method="triple", replicas={a: 0, b: 1},
                  env=rm.Env(compute={"CPU": 1}), ready_timeout=10)
    time.sleep(10.5)  # b's replica is past ready_timeout
    m.add_replicas({a: 1})  # a's starts now, well within it
    values = m.map(range(40), batch_size=1)
    print(json.dumps({"values": values, "replicas": m.num_replicas}))
    m.shutdown()
    blocker.shutdown()
"""


@pytest.mark.timeout(300)
def test_a_cluster_whose_replicas_cannot_start_does_not_fail_the_map(heads):
    result = run_on_both(heads, ONE_CLUSTER_CANNOT_START)
    assert result["values"] == [3 * x for x in range(40)], "the map completed on cluster a"
    assert result["replicas"] == 2, "b's replica still waits for room"


REPLACEMENT_IN_PROGRESS = """
    import json, sys, threading, time
    import rhmapper as rm
    from rhmapper.replicas import ReplicaPool
    from rhmapper.slots import Inbox

    a, b = sys.argv[1:3]

    m = rm.mapper(abs, replicas={a: 1, b: 0})
    m.wait_ready(timeout=120)
    pool = m._backend.pool
    replacing, create = threading.Event(), ReplicaPool._create

    def slow_create(self, index):  # the replacement holds the pool's lock, the old one gone
        replacing.set()
        time.sleep(3)
        return create(self, index)

    ReplicaPool._create = slow_create
    replacer = threading.Thread(target=pool.pools[a].lost,
                                args=(pool.pools[a].replicas[0], RuntimeError("replaced")))
    replacer.start()
    assert replacing.wait(60)
    try:  # what a map does between its dispatches: wait, with nothing in flight or ready
        pool.wait(Inbox(), 0.5)
        raised = None
    except rm.NoReplicasError as error:
        raised = str(error)
    replacer.join(60)
    ReplicaPool._create = create
    print(json.dumps({"raised": raised, "values": m.map(range(-20, 0))}))
    m.shutdown()
"""


@pytest.mark.timeout(300)
def test_a_map_does_not_see_a_pool_empty_while_a_replica_is_replaced(heads):
    result = run_on_both(heads, REPLACEMENT_IN_PROGRESS)
    assert result["raised"] is None, result["raised"]
    assert result["values"] == [abs(x) for x in range(-20, 0)]


FAILOVER = """
    import json, sys, time, warnings
    import rhmapper as rm

    a, b = sys.argv[1:3]

    def slow(x):
        time.sleep(0.2)
        return x * 5

    m = rm.mapper(slow, replicas={a: 2, b: 2}, env=rm.Env(compute={"CPU": 0.5}))
    m.wait_ready(timeout=120)
    values = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for value in m.imap(range(80), batch_size=1):
            values.append(value)
            if len(values) == 10:
                print("STOP", flush=True)  # the test stops cluster b now
    print(json.dumps({"values": values, "warnings": [str(w.message) for w in caught],
                      "replicas": m.num_replicas}))
    m.shutdown()
"""


@pytest.mark.stops_heads
@pytest.mark.timeout(300)
def test_map_completes_on_the_other_cluster_when_one_is_lost(heads):
    a, b = heads.live(2)
    driver = start_driver(FAILOVER, a.driver_env(RAY_CLIENT_RECONNECT_GRACE_PERIOD="3"),
                          a.client_address, b.client_address)
    try:
        assert driver.next_line(timeout=150) == "STOP"
        b.stop()  # every process of cluster b, by pid, mid-map
        result = json.loads(driver.finish(timeout=120))
    finally:
        driver.kill()
    assert result["values"] == [5 * x for x in range(80)], "every result once, in order"
    assert result["replicas"] == 2, "cluster b's replicas left the pool"
    assert any(b.client_address in message and "unreachable" in message
               for message in result["warnings"]), result["warnings"]


EVERY_CLUSTER_LOST = """
    import itertools, json, sys, time
    import psutil
    import rhmapper as rm

    a, b = sys.argv[1:3]

    def slow(x):
        time.sleep(0.2)
        return x

    m = rm.mapper(slow, replicas={a: 1, b: 1}, env=rm.Env(compute={"CPU": 0.5}))
    m.wait_ready(timeout=120)
    try:
        for count, _ in enumerate(m.imap(itertools.count(), batch_size=1), 1):
            if count == 4:
                print("STOP", flush=True)  # the test stops both clusters now
    except rm.NoReplicasError as caught:
        # A Ray call over a lost connection would start a local Ray under this driver.
        local_ray = [child.name() for child in psutil.Process().children(recursive=True)]
        print(json.dumps({"error": str(caught), "local_ray": local_ray}))
"""


@pytest.mark.stops_heads
@pytest.mark.timeout(300)
def test_losing_every_cluster_raises_no_replicas(heads):
    a, b = heads.live(2)
    driver = start_driver(EVERY_CLUSTER_LOST,
                          a.driver_env(RAY_CLIENT_RECONNECT_GRACE_PERIOD="3"),
                          a.client_address, b.client_address)
    try:
        assert driver.next_line(timeout=150) == "STOP"
        stop_heads([a, b])  # both at once
        result = json.loads(driver.finish(timeout=120))
    finally:
        driver.kill()
    error = result["error"]
    assert "no replica is left on any cluster" in error, error
    assert result["local_ray"] == [], "no Ray was started on the driver after the loss"
    assert f"{a.client_address} (unreachable)" in error and f"{b.client_address} (unreachable)" in error


COMBINED_VERBS = """
    import json, queue, sys, threading, time
    import rhmapper as rm

    a, b = sys.argv[1:3]

    def plus_one(x):
        return x + 1

    def blocking(inputs):
        while (item := inputs.get()) is not None:
            yield item

    m = rm.mapper(plus_one, replicas={a: 1, b: 1}, env=rm.Env(compute={"CPU": 0.5}))
    m.wait_ready(timeout=120)
    nested = [(r, m.map([r], timeout=10)[0], m.call(r)) for r in m.imap(range(6), batch_size=1)]
    zipped = list(zip(m.imap(range(20), window=4), m.imap(range(100, 120), window=4)))
    inputs = queue.Queue()
    inputs.put(1)
    blocked = []
    reader = threading.Thread(target=lambda: blocked.extend(m.imap(blocking(inputs), batch_size=1)),
                              daemon=True)
    reader.start()
    time.sleep(1.0)  # the reader waits inside its input iterator
    began = time.monotonic()
    beside = m.map(range(30), timeout=10)
    beside_seconds = time.monotonic() - began
    inputs.put(2)
    inputs.put(None)
    reader.join(60)
    print(json.dumps({"nested": nested, "zipped": zipped, "beside": beside,
                      "beside_seconds": beside_seconds, "blocked": blocked,
                      "reader_done": not reader.is_alive()}))
    m.shutdown()
"""


@pytest.mark.timeout(300)
def test_verbs_combined_end_over_several_clusters(heads):
    """A map and a call inside an imap loop, two imaps read in turn, and a map beside another
    thread's blocking input iterator, on a mapper over two clusters: each ends (the driver's wait
    is bounded), with every value right."""
    result = run_on_both(heads, COMBINED_VERBS)
    assert result["nested"] == [[x + 1, x + 2, x + 2] for x in range(6)]
    assert result["zipped"] == [[x + 1, x + 101] for x in range(20)]
    assert result["beside"] == list(range(1, 31)) and result["beside_seconds"] < 30
    assert result["reader_done"] and result["blocked"] == [2, 3]
