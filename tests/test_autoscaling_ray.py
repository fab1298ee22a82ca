"""Autoscaling pools on Ray: a pool at zero starts for a map, grows with its backlog, runs each
item once (counted in files the replicas write), and shrinks back to ``min`` once idle; locally
and with the mapper on the cluster."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import rhmapper as rm
from tests.ray_head import wait_until

pytestmark = pytest.mark.timeout(240)


def slow_square(x: int, runs: str) -> int:
    """x squared after 0.3 s; each run leaves a line in ``runs/x``."""
    with open(os.path.join(runs, str(x)), "a") as log:
        log.write(f"{os.getpid()}\n")
    time.sleep(0.3)
    return x * x


def runs_of(path: Path, items: range) -> dict[int, int]:
    return {x: len((path / str(x)).read_text().splitlines()) if (path / str(x)).exists() else 0
            for x in items}


@pytest.mark.parametrize("on_cluster", [False, True], ids=["local", "on_cluster"])
def test_a_pool_at_zero_grows_for_a_map_runs_each_item_once_and_shrinks_to_min(
        ray_local, tmp_path, capfd, on_cluster):
    scale = rm.Autoscale(min=0, max=3, idle_seconds=2)
    with rm.mapper(slow_square, replicas=scale, env=rm.Env(compute={"CPU": 0.5}),
                   on_cluster=on_cluster) as m:
        assert m.num_replicas == 0
        items = range(40)
        assert m.map(items, kwargs={"runs": str(tmp_path)}, batch_size=1, progress=True) == [
            x * x for x in items]
        assert "starting, target" in capfd.readouterr().err  # the bar shows the counts
        count = m.num_replicas
        assert count.target == m.scaling_history()[-1].target and 1 < count <= scale.max
        assert count.ready + count.starting == count
        assert runs_of(tmp_path, items) == dict.fromkeys(items, 1)  # once each, none lost
        pids = {line for x in items for line in (tmp_path / str(x)).read_text().splitlines()}
        assert len(pids) > 1, "the map ran on one replica: the pool did not grow"
        history = m.scaling_history()
        ups = [decision for decision in history if decision.change > 0]
        assert ups and ups[0].size == 0 and "backlog of" in ups[0].reason
        assert max(decision.size + decision.change for decision in history) <= scale.max
        assert wait_until(lambda: m.num_replicas == 0, seconds=scale.idle_seconds + 10), (
            f"still {m.num_replicas} replicas long after the map: {m.scaling_history()}")
        downs = [decision for decision in m.scaling_history() if decision.change < 0]
        assert downs and "idle for 2 s or more" in downs[-1].reason
        assert m.map([3], kwargs={"runs": str(tmp_path)}) == [9]  # from zero again


def test_a_spawned_map_grows_the_pool_on_the_cluster_and_it_shrinks_after(ray_local, tmp_path):
    scale = rm.Autoscale(min=0, max=3, idle_seconds=2)
    with rm.mapper(slow_square, replicas=scale, env=rm.Env(compute={"CPU": 0.5}),
                   on_cluster=True) as m:
        items = range(30)
        spawned = m.spawn_map(items, name="autoscaled_spawn", kwargs={"runs": str(tmp_path)},
                              batch_size=1)
        assert spawned.results() == [x * x for x in items]
        assert runs_of(tmp_path, items) == dict.fromkeys(items, 1)
        pids = {line for x in items for line in (tmp_path / str(x)).read_text().splitlines()}
        assert len(pids) > 1, "the spawned map ran on one replica: the pool did not grow"
        assert any(decision.change > 0 and decision.size == 0
                   for decision in m.scaling_history())
        assert wait_until(lambda: m.num_replicas == 0, seconds=scale.idle_seconds + 10), (
            f"still {m.num_replicas} replicas long after the spawned map: {m.scaling_history()}")


def test_replicas_still_waiting_for_resources_stop_too_once_the_work_is_done(ray_local):
    # 4 CPUs: two replicas of 1.5 CPU start, the others the unmeasured map asks for wait.
    scale = rm.Autoscale(min=0, max=4, idle_seconds=2)
    with rm.mapper(abs, replicas=scale, env=rm.Env(compute={"CPU": 1.5})) as m:
        assert m.map(range(-8, 0)) == list(range(8, 0, -1))
        assert max(d.size + d.change for d in m.scaling_history()) == scale.max
        assert wait_until(lambda: m.num_replicas == 0, seconds=scale.idle_seconds + 10), (
            f"{m.num_replicas!r} ({m.num_replicas.starting} starting) long after the map: "
            f"{m.scaling_history()}")


def test_your_actors_count_and_are_never_stopped(ray_local, tmp_path):
    import ray

    class Squarer:
        def square(self, x, runs):
            return slow_square(x, runs)

    actor = ray.remote(Squarer).options(num_cpus=0.5).remote()
    with rm.mapper(Squarer, method="square", replicas=[actor]) as m:
        m.add_replicas(rm.Autoscale(min=1, max=2, idle_seconds=1))
        assert m.num_replicas == 1 and m.scaling_history()[-1].change == 0
        assert m.map(range(6), kwargs={"runs": str(tmp_path)}) == [x * x for x in range(6)]
        time.sleep(3)  # idle for longer than idle_seconds
        assert m.replicas == [actor]  # yours stays; an auto replica, if any started, left
        assert ray.get(actor.square.remote(2, str(tmp_path))) == 4  # alive
    ray.kill(actor)


def test_autoscale_is_refused_where_it_cannot_apply(ray_local):
    with rm.mapper(abs, replicas=1) as m:
        with pytest.raises(ValueError, match="concurrency applies to your own actors"):
            m.add_replicas(rm.Autoscale(max=2), concurrency=2)
