"""A pool is what it says it runs: named replicas built from something else are never used."""

from __future__ import annotations

import os

import pytest
import ray

import rhmapper as rm

pytestmark = pytest.mark.usefixtures("ray_local")


def add_one(x):
    return x + 1


def times_ten(x):
    return x * 10


def pid_of(_x):
    return os.getpid()


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def scale(self, x):
        return x * self.factor


def detached(name: str) -> rm.Env:
    return rm.Env(name=name, detached=True, compute={"CPU": 0.25})


def test_attaching_another_function_to_a_detached_pool_is_refused():
    first = rm.mapper(add_one, replicas=2, env=detached("ident_fn"))
    try:
        assert first.map([1, 2, 3]) == [2, 3, 4]
        second = rm.mapper(times_ten, replicas=2, env=detached("ident_fn"))
        with pytest.raises(rm.PoolMismatchError) as caught:
            second.map([1, 2, 3])
        message = str(caught.value)
        assert "'ident_fn'" in message and "target" in message
        assert "rhmapper kill ident_fn" in message and "replace_mismatched=True" in message
        bigger = rm.mapper(times_ten, replicas=3, env=detached("ident_fn"))
        with pytest.raises(rm.PoolMismatchError):
            bigger.map(range(30))  # never a mix of add_one and times_ten results
        bigger.shutdown(kill=False)
        assert first.map([5]) == [6], "the old pool is untouched"
    finally:
        first.shutdown(kill=True)


def test_same_function_attaches_to_its_detached_pool():
    first = rm.mapper(pid_of, replicas=2, env=detached("ident_same"))
    try:
        pids = set(first.map(range(20)))
        again = rm.mapper(pid_of, replicas=2, env=detached("ident_same"))
        assert set(again.map(range(20))) <= pids and again.replica_names == first.replica_names
    finally:
        first.shutdown(kill=True)


def test_other_constructor_arguments_are_a_mismatch_and_replace_rebuilds():
    first = rm.mapper(rm.module(Scaler, 2), method="scale", replicas=1,
                      env=detached("ident_module"))
    try:
        assert first.map([1, 2]) == [2, 4]
        other = rm.mapper(rm.module(Scaler, 3), method="scale", replicas=1,
                          env=detached("ident_module"))
        with pytest.raises(rm.PoolMismatchError, match="constructor"):
            other.wait_ready(timeout=60)
        replaced = rm.mapper(rm.module(Scaler, 3), method="scale", replicas=1,
                             env=detached("ident_module"), replace_mismatched=True)
        assert replaced.map([1, 2]) == [3, 6]
        assert replaced.replica_names == ["ident_module_replica_0"]
        replaced.shutdown(kill=True)
    finally:
        first.shutdown(kill=True)


def test_other_concurrency_is_a_mismatch():
    first = rm.mapper(add_one, replicas=1, env=detached("ident_conc"))
    try:
        first.wait_ready(timeout=60)
        other = rm.mapper(add_one, replicas=1, env=detached("ident_conc"), concurrency=2)
        with pytest.raises(rm.PoolMismatchError, match="concurrency"):
            other.map([1])
    finally:
        first.shutdown(kill=True)


def test_lambdas_sharing_a_name_get_pools_of_their_own():
    plus = rm.mapper(lambda x: x + 1, replicas=1)
    times = rm.mapper(lambda x: x * 10, replicas=1)
    try:
        assert plus.env.name != times.env.name
        assert plus.env.name.startswith("lambda_") and times.env.name.startswith("lambda_")
        assert plus.map([1, 2]) == [2, 3] and times.map([1, 2]) == [10, 20]
    finally:
        plus.shutdown()
        times.shutdown()


def test_detached_env_needs_a_name():
    with pytest.raises(ValueError, match="detached Env needs an explicit name"):
        rm.mapper(add_one, env=rm.Env(detached=True))
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("add_one")]
