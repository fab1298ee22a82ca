"""Node loss on a real multi-node cluster (ray.cluster_utils.Cluster): nothing lost, no hang."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

import rhmapper as rm
from tests.conftest import TESTS_RUNTIME_ENV

pytestmark = pytest.mark.multinode


def where(x):
    time.sleep(0.02)
    return (x * x, ray.get_runtime_context().get_node_id())


def add_worker(cluster: Cluster, index: int):
    """Worker node ``index``: 2 CPUs and the custom resource ``worker_<index>``."""
    return cluster.add_node(num_cpus=2, resources={f"worker_{index}": 1})


@pytest.fixture(scope="module")
def module_cluster():
    """A head (1 CPU) and two worker nodes, shared by the module's tests (see `cluster`)."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [add_worker(cluster, i) for i in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=TESTS_RUNTIME_ENV)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def cluster(module_cluster):
    """The module's cluster and its worker nodes; a worker node the test removed is replaced
    after it by a new one with the same resources, so that every test finds the cluster alike
    (the test's mapper has killed its replicas on leaving its ``with``)."""
    cluster, workers = module_cluster
    yield cluster, list(workers)
    for index, node in enumerate(workers):
        if node not in cluster.worker_nodes:
            workers[index] = add_worker(cluster, index)
    cluster.wait_for_nodes()


@pytest.mark.parametrize("compiled_graphs", [False, True])
def test_map_survives_losing_a_worker_node(cluster, compiled_graphs):
    cluster, workers = cluster
    env = rm.Env(name="spread", compute={"CPU": 0.5})
    with rm.mapper(where, replicas=6, env=env, compiled_graphs=compiled_graphs
                   ).wait_ready(timeout=120) as m:
        doomed = workers[0].node_id
        nodes = {node for _, node in m.map(range(60), batch_size=1)}
        assert doomed in nodes and len(nodes) >= 2, "replicas did not spread over the nodes"
        two_hundred_done, removed = threading.Event(), threading.Event()

        def remove_when_200_are_done():
            if two_hundred_done.wait(timeout=120):
                cluster.remove_node(workers[0])
                removed.set()

        remover = threading.Thread(target=remove_when_200_are_done, daemon=True)
        remover.start()
        results, removed_mid_map = [], False
        for value in m.imap(range(1500), batch_size=2):
            results.append(value)
            if len(results) == 200:
                two_hundred_done.set()
            removed_mid_map = removed_mid_map or removed.is_set()
        remover.join(60)
        assert removed_mid_map, "the worker node was not removed while the map ran"
        assert [square for square, _ in results] == [x * x for x in range(1500)]
        assert doomed not in {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        survivors = {node for _, node in m.map(range(60), batch_size=1)}
        assert doomed not in survivors and survivors


def test_replicas_that_cannot_be_placed_again_fail_clearly(cluster):
    cluster, workers = cluster
    env = rm.Env(name="pinned", compute={"CPU": 0.5, "worker_1": 0.5})
    with rm.mapper(where, replicas=2, env=env).wait_ready(timeout=120) as m:
        assert {node for _, node in m.map(range(4))} == {workers[1].node_id}
        cluster.remove_node(workers[1])
        started = time.monotonic()
        with pytest.raises(rm.NoReplicasError, match="worker_1"):
            m.map(range(100))
        assert time.monotonic() - started < 60


def logged_nap(x, log):
    with open(log, "a") as file:  # one line per item started, appended by the replicas
        file.write(f"{x}\n")
    time.sleep(x)
    return x


def test_a_long_call_on_another_node_keeps_its_compiled_replica(cluster, tmp_path):
    """A call queued behind one that outlasts Ray's 10 s send timeout, over a graph to another
    node (whose channel Ray gives a single buffer), is sent without timing out: a timeout would
    count as the replica's death and run the long item again."""
    cluster, workers = cluster
    log = tmp_path / "started.log"
    env = rm.Env(name="remote_graphs", compute={"CPU": 0.5, "worker_0": 0.5})
    with rm.mapper(logged_nap, replicas=2, env=env, compiled_graphs=True
                   ).wait_ready(timeout=120) as m:
        items = [0.0] * 200 + [12.0] + [0.0] * 20  # fast items first: calls are queued ahead
        assert m.map(items, batch_size=1, kwargs={"log": str(log)}) == items
        runs = log.read_text().split()
        assert runs.count("12.0") == 1, "the long item ran once: its replica was not killed"
        assert len(runs) == len(items)

