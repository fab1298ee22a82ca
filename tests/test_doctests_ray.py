"""The examples in the docstrings of the Ray edge (the mapper's verbs, the pool, what replicas
run, end signals, feasibility) run as written, on the session's Ray."""

from __future__ import annotations

import doctest
import importlib

import pytest

import rhmapper as rm


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", [
    "rhmapper.mapper", "rhmapper.replicas", "rhmapper.module", "rhmapper.batch_runner",
    "rhmapper.signals",
    "rhmapper.feasibility", "rhmapper.backend", "rhmapper.host", "rhmapper.host_driver",
    "rhmapper.spawned", "rhmapper.clusters",
    "rhmapper.compiled", "rhmapper.ray_replica", "rhmapper.pool_setup", "rhmapper.replica_launcher",
    "rhmapper.call_sender", "rhmapper.arguments", "rhmapper.pool_verbs", "rhmapper.batching",
    "rhmapper.autoscaling", "rhmapper.metrics", "rhmapper.stacks", "rhmapper.async_verbs",
])
def test_ray_edge_examples_run(ray_local, name):
    module = importlib.import_module(name)  # (`rhmapper.mapper` alone is the function)
    result = doctest.testmod(module, extraglobs={"rm": rm}, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable examples"
    assert result.failed == 0
