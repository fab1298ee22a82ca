"""Multi-node: replicas spill over from a small head onto worker nodes; custom resources pin them.

The cluster is a ``ray.cluster_utils.Cluster`` on this machine: a 1-CPU head and two 2-CPU worker
nodes, one of which offers the custom resource ``special``. The session's local Ray is shut down
first (multi-node tests run last) and Ray is left shut down at the end.
"""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster

import rhmapper as rm
from tests.conftest import TESTS_RUNTIME_ENV

pytestmark = pytest.mark.multinode


class Where:
    """Reports, from inside the replica, the node it runs on."""

    def node(self, _item=None):
        time.sleep(0.02)
        return ray.get_runtime_context().get_node_id()


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        special = cluster.add_node(num_cpus=2, resources={"special": 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=TESTS_RUNTIME_ENV, log_to_driver=False)
        yield cluster, special
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_cpu_fraction_replicas_spill_onto_several_nodes(cluster):
    alive = [node for node in ray.nodes() if node["Alive"]]
    assert len(alive) == 3 and sum(node["Resources"]["CPU"] for node in alive) == 5
    env = rm.Env(name="spill", compute={"CPU": 0.5})
    with rm.mapper(rm.module(Where), method="node", replicas=6, env=env) as m:
        m.wait_ready(timeout=120)
        per_replica = m.broadcast("node")
        per_item = m.map(range(60), batch_size=1)
    assert len(per_replica) == 6
    assert len(set(per_replica)) >= 2, f"6 replicas of 0.5 CPU all ran on one node: {per_replica}"
    assert len(set(per_item)) >= 2, per_item
    assert set(per_item) <= set(per_replica)
    assert set(per_replica) <= {node["NodeID"] for node in alive}


def test_custom_resource_pins_a_replica_to_the_node_that_has_it(cluster):
    _, special = cluster
    holders = [node["NodeID"] for node in ray.nodes()
               if node["Alive"] and node["Resources"].get("special", 0) >= 1]
    assert holders == [special.node_id]
    env = rm.Env(name="pinned", compute={"special": 1})
    with rm.mapper(rm.module(Where), method="node", replicas=1, env=env) as m:
        m.wait_ready(timeout=120)
        nodes = m.map(range(10), batch_size=1)
    assert set(nodes) == {special.node_id}


def test_the_mapper_on_the_cluster_runs_on_the_head_and_spills_its_replicas(cluster):
    env = rm.Env(name="hosted_spill", compute={"CPU": 0.5})
    with rm.mapper(rm.module(Where), method="node", replicas=6, env=env, on_cluster=True) as m:
        m.wait_ready(timeout=120)
        host = m._backend.host
        host_node, host_resources = ray.get(host.__ray_call__.remote(lambda self: (
            ray.get_runtime_context().get_node_id(),
            ray.get_runtime_context().get_assigned_resources())))
        per_item = m.map(range(60), batch_size=1)
    assert host_node == cluster[0].head_node.node_id
    assert "CPU" not in host_resources, host_resources
    assert len(set(per_item)) >= 2, f"the host's replicas all ran on one node: {per_item}"
