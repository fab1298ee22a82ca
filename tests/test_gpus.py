"""Fractional GPUs on a real cluster: ``Env(compute={"GPU": 0.5})`` puts two replicas on each GPU.

The cluster is a ``ray.cluster_utils.Cluster`` on this CPU-only machine: a 1-CPU head without
GPUs and one 2-CPU worker node that declares 2 GPUs to Ray (``num_gpus=2``). Ray assigns GPU ids
and sets ``CUDA_VISIBLE_DEVICES`` in each replica as it does on a real GPU node. The session's
local Ray is shut down first (multi-node tests run last) and Ray is left shut down at the end.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time

import pytest
import ray
from ray.cluster_utils import Cluster

import rhmapper as rm
from tests.conftest import TESTS_RUNTIME_ENV

pytestmark = pytest.mark.multinode

HALF_GPU = {"CPU": 0.25, "GPU": 0.5}
"""Four of these fit the GPU node's 2 GPUs (and its 2 CPUs with room to spare): GPUs run out
first."""


class GpuSeer:
    """Reports, from inside the replica, the GPU Ray gave it and how many calls it ran."""

    def __init__(self):
        self.calls = 0

    def seen(self, _item=None):
        self.calls += 1
        context = ray.get_runtime_context()
        return {"actor": context.get_actor_id(), "node": context.get_node_id(),
                "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_share": context.get_assigned_resources().get("GPU"),
                "calls": self.calls}


@pytest.fixture(scope="module")
def gpu_node():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    try:
        node = cluster.add_node(num_cpus=2, num_gpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=TESTS_RUNTIME_ENV, log_to_driver=False)
        yield node.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


def _gpus_free(timeout: float = 30.0) -> None:
    """Wait (bounded) until the previous test's replicas have given both GPUs back."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("GPU", 0) < 2:
        assert time.monotonic() < deadline, f"GPUs still held: {ray.available_resources()}"
        time.sleep(0.2)


def _assert_two_per_gpu(seen: list[dict], gpu_node: str) -> None:
    """Four replicas on the GPU node share its 2 GPU ids two by two, each seeing its own."""
    assert len({answer["actor"] for answer in seen}) == 4, seen
    for answer in seen:
        assert answer["node"] == gpu_node, answer
        assert len(answer["gpu_ids"]) == 1, answer
        assert answer["cuda"] == answer["gpu_ids"][0], answer
        assert answer["gpu_share"] == 0.5, answer
    holders = collections.Counter(answer["gpu_ids"][0] for answer in seen)
    assert sorted(holders) == ["0", "1"] and set(holders.values()) == {2}, holders


@contextlib.contextmanager
def four_half_gpu_replicas(name: str, gpu_node: str):
    """A mapper of four half-GPU replicas, checked to share the 2 GPUs two by two, and what
    each replica said of its GPU."""
    _gpus_free()
    env = rm.Env(name=name, compute=HALF_GPU)
    with rm.mapper(rm.module(GpuSeer), method="seen", replicas=4, env=env) as m:
        m.wait_ready(timeout=60)
        seen = m.broadcast("seen")
        _assert_two_per_gpu(seen, gpu_node)
        yield m, seen


def test_four_half_gpu_replicas_share_two_gpus_two_by_two(gpu_node):
    with four_half_gpu_replicas("half_gpu", gpu_node) as (m, seen):
        gpu_of = {answer["actor"]: answer["gpu_ids"][0] for answer in seen}
        assert ray.available_resources().get("GPU", 0) == 0, ray.available_resources()
        mapped = m.map(range(40), batch_size=1)
        after = m.broadcast("seen")
    # every call ran on one of the four replicas, on the GPU that replica was given
    assert {answer["actor"] for answer in mapped} <= set(gpu_of)
    assert all(answer["gpu_ids"] == [gpu_of[answer["actor"]]] == [answer["cuda"]]
               for answer in mapped), mapped
    assert sum(answer["calls"] for answer in after) == 4 + 40 + 4, after  # counted inside


def test_a_fifth_half_gpu_replica_waits_for_a_gpu(gpu_node):
    with four_half_gpu_replicas("gpu_four", gpu_node) as (m, seen):
        ready = {answer["actor"] for answer in seen}

        # a 5th replica of the same pool: feasible (a node has GPUs), but none is free
        m.add_replicas(1)
        assert m.num_replicas == 5
        with pytest.raises(TimeoutError, match=r"1 replica\(s\) of env 'gpu_four' not ready "
                                               r"after 3s \(each asks for CPU=0.25, GPU=0.5"):
            m.wait_ready(timeout=3)
        mapped = m.map(range(20), batch_size=1)  # the four others keep working
        assert {answer["actor"] for answer in mapped} <= ready
        assert [answer["gpu_ids"] == [answer["cuda"]] for answer in mapped] == [True] * 20

        # a replica that can only wait for a GPU: the map fails with ready_timeout's message
        waiting = rm.mapper(rm.module(GpuSeer), method="seen", replicas=1, ready_timeout=3,
                            env=rm.Env(name="gpu_fifth", compute=HALF_GPU))
        try:
            started = time.monotonic()
            with pytest.raises(rm.NoReplicasError) as caught:
                waiting.map(range(3))
            assert time.monotonic() - started < 20
            message = str(caught.value)
            for words in ["no replica is ready", "1 replica(s) of env 'gpu_fifth'",
                          "ready_timeout=3", "not enough free CPU, GPU on the cluster?"]:
                assert words in message, message
            assert m.map(range(8), batch_size=1)[-1]["actor"] in ready

            # it was waiting for a GPU: drop the pending 5th and one ready replica, and the
            # waiting replica starts on the half GPU that replica gave back
            gpu_of_name = dict(zip(m.replica_names[:4], (a["gpu_ids"][0] for a in seen)))
            dropped = m.replica_names[3]
            m.drop_replicas(2)
            assert m.num_replicas == 3
            waiting.wait_ready(timeout=30)
            [answer] = waiting.broadcast("seen")
            assert answer["node"] == gpu_node and answer["gpu_share"] == 0.5, answer
            assert answer["gpu_ids"] == [gpu_of_name[dropped]] == [answer["cuda"]], answer
            assert max(a["calls"] for a in waiting.map(range(3), batch_size=1)) == 1 + 3
        finally:
            waiting.shutdown()
