"""Calls over a Ray Compiled Graph per auto replica (``compiled_graphs=True``), on a real local
Ray: the same values, failure model and cleanup as ordinary actor calls."""

from __future__ import annotations

import collections
import os
import threading
import time

import pytest
import ray

import rhmapper as rm
from rhmapper import _ray_compat, compiled
from rhmapper.env import replica_name
from rhmapper.names import NAMESPACE
from tests.conftest import REPO_DIR
from tests.driver_process import DriverProcess

pytestmark = pytest.mark.usefixtures("ray_local")


def nap(x, log=None):
    """Sleep ``x`` seconds; ``(x, ran on the actor's main thread)``. With ``log``, one line per
    item started, appended by the replicas."""
    if log is not None:
        with open(log, "a") as file:
            file.write(f"{x}\n")
    time.sleep(x)
    return x, threading.current_thread() is threading.main_thread()


def started(log) -> list[str]:
    return log.read_text().split() if log.exists() else []


def graph_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("rhmapper-graph-")]


def values_and_threads(results: list) -> tuple[list, set]:
    return [value for value, _ in results], {on_main for _, on_main in results}


def test_calls_run_over_the_compiled_graph_with_the_right_values(tmp_path):
    log = tmp_path / "started.log"
    items = [i / 1e6 for i in range(500)]
    with rm.mapper(nap, replicas=3, compiled_graphs=True) as m:
        m.wait_ready(timeout=120)
        values, on_main = values_and_threads(m.map(items, batch_size=1, kwargs={"log": str(log)}))
        assert values == items
        assert on_main == {False}, "every call ran on the graph's thread"
        assert sorted(map(float, started(log))) == items, "each item ran once"
        values, on_main = values_and_threads(m.map([0] * 5000))  # auto batches: the same graph
        assert values == [0] * 5000 and on_main == {False}
        assert m.call(0.0) == (0.0, False)
        assert sorted(m.imap_unordered(items[:50], batch_size=1)) == [(x, False) for x in items[:50]]
        assert m.starmap([(0.0, None)] * 3, batch_size=1) == [(0.0, False)] * 3
        assert len(graph_threads()) == 3, "one thread drives each replica's graph"
    assert graph_threads() == [], "shutdown ended every graph's thread"
    with rm.mapper(nap, replicas=1) as m:  # without it: the actor's main thread
        assert m.map([0, 0], batch_size=1) == [(0, True), (0, True)]


def test_a_replica_killed_mid_map_loses_nothing_and_its_replacement_compiles(tmp_path):
    log = tmp_path / "started.log"
    with rm.mapper(nap, replicas=3, compiled_graphs=True) as m:
        m.wait_ready(timeout=120)
        names = sorted(m.replica_names)
        victim = m.replicas[0]
        killer = threading.Timer(1.0, lambda: ray.kill(victim, no_restart=True))
        killer.start()
        values, _ = values_and_threads(m.map([0.02] * 300, batch_size=1, kwargs={"log": str(log)}))
        killer.join(10)
        assert values == [0.02] * 300
        runs = len(started(log))
        assert 300 <= runs <= 301, f"{runs} runs: only the call running on the killed replica ran again"
        m.wait_ready(timeout=120)
        assert m.num_replicas == 3 and sorted(m.replica_names) == names
        assert victim not in m.replicas, "the killed replica was replaced under its name"
        values, on_main = values_and_threads(m.map([0] * 60, batch_size=1))
        assert values == [0] * 60 and on_main == {False}, "the replacement has its own graph"


def test_timeout_fails_the_hung_item_and_restarts_its_replica(tmp_path):
    log = tmp_path / "started.log"
    with rm.mapper(nap, replicas=2, compiled_graphs=True) as m:
        m.wait_ready(timeout=120)
        before = set(m.replicas)
        items = [0.0, 0.01, 60.0, 0.02, 0.03]
        results = m.map(items, batch_size=1, timeout=1.0, return_exceptions=True,
                        kwargs={"log": str(log)})
        assert isinstance(results[2], TimeoutError) and "ran longer than timeout=1.0s" in str(
            results[2])
        assert [r[0] for i, r in enumerate(results) if i != 2] == [0.0, 0.01, 0.02, 0.03]
        assert sorted(map(float, started(log))) == sorted(items), "each item ran once"
        started_at = time.monotonic()
        values, on_main = values_and_threads(m.map([0] * 40, batch_size=1))
        assert values == [0] * 40 and on_main == {False}
        assert time.monotonic() - started_at < 30, "the next map did not wait for the 60 s item"
        m.wait_ready(timeout=120)
        assert len(before - set(m.replicas)) == 1, "the stuck replica was restarted"


def test_cancel_starts_no_call_queued_on_a_replica(tmp_path):
    log = tmp_path / "started.log"
    items = [0.0] * 300 + [1.5] * 6  # fast items first: then one call is queued behind each
    with rm.mapper(nap, replicas=2, compiled_graphs=True) as m:
        m.wait_ready(timeout=120)

        def cancel_once_both_replicas_nap() -> None:
            deadline = time.monotonic() + 60
            while started(log).count("1.5") < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            m.cancel()

        canceller = threading.Thread(target=cancel_once_both_replicas_nap)
        canceller.start()
        with pytest.raises(rm.MapCancelledError):
            m.map(items, batch_size=1, kwargs={"log": str(log)})
        canceller.join(70)
        time.sleep(3.0)  # the running naps have ended: a call queued behind one would start now
        assert started(log).count("1.5") == 2, "no call queued behind the cancel started"
        values, on_main = values_and_threads(m.map([0] * 10, batch_size=1))
        assert values == [0] * 10 and on_main == {False}


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_graph_is_torn_down_and_set_up_again(monkeypatch):
    monkeypatch.setattr(compiled, "IDLE_SECONDS", 1.0)
    with rm.mapper(nap, replicas=2, compiled_graphs=True) as m:
        assert m.map([0] * 10, batch_size=1) == [(0, False)] * 10
        pids = ray.get([replica.__ray_call__.remote(lambda self: os.getpid())
                        for replica in m.replicas], timeout=60)
        time.sleep(2.5)  # idle for longer than IDLE_SECONDS: the graphs are closed
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(2.0)
        used = [cpu_seconds(pid) - start for pid, start in zip(pids, before)]
        assert max(used) < 0.3, f"idle replicas used {used} s of CPU in 2 s (an open graph spins)"
        assert m.map([0] * 10, batch_size=1) == [(0, False)] * 10, "set up again for the next map"


CALLS: collections.Counter = collections.Counter()
"""In each replica's process: how many items `counted` ran there."""


def counted(x):
    CALLS["items"] += 1
    return x


def items_counted(_instance) -> int:
    return CALLS["items"]


def test_compiling_a_graph_counts_against_no_calls_timeout(monkeypatch):
    monkeypatch.setattr(compiled, "IDLE_SECONDS", 1.0)
    open_graph = compiled.CompiledCalls._open_graph

    def compile_slowly(calls, *args):  # 0.4 s more per compile, one compile at a time (as Ray's)
        if calls._graph is None:
            with compiled._compile_lock:
                time.sleep(0.4)
        return open_graph(calls, *args)

    monkeypatch.setattr(compiled.CompiledCalls, "_open_graph", compile_slowly)
    items = list(range(40))
    with rm.mapper(counted, replicas=4, compiled_graphs=True) as m:
        m.wait_ready(timeout=120)  # ready, and no graph compiled yet: the map's calls compile them
        actors = [_ray_compat.actor_id_hex(handle) for handle in m.replicas]
        for turn, when in enumerate(["first calls", "after the graphs idled"], start=1):
            started_at = time.monotonic()
            assert m.map(items, batch_size=1, timeout=0.5) == items, when
            assert time.monotonic() - started_at > 1.6, f"{when}: the four graphs were compiled"
            assert [_ray_compat.actor_id_hex(handle) for handle in m.replicas] == actors, (
                f"{when}: a replica was restarted as overtime while graphs compiled")
            counts = ray.get([handle.__ray_call__.remote(items_counted) for handle in m.replicas],
                             timeout=60)
            assert sum(counts) == turn * len(items), f"{when}: each item ran once ({counts})"
            assert min(counts) > 0, f"{when}: every replica compiled and ran calls ({counts})"
            time.sleep(2.0)  # idle past IDLE_SECONDS: the graphs are closed, compiled again next


def test_large_items_go_by_reference_over_the_graph():
    items = [bytes([i]) * (3 << 20) for i in range(8)]  # over 1 MiB: sent with ray.put
    with rm.mapper(len, replicas=2, compiled_graphs=True) as m:
        m.wait_ready(timeout=120)
        assert m.map(items, batch_size=1) == [3 << 20] * 8
        assert m.map(items, batch_size=2) == [3 << 20] * 8


def test_an_unpicklable_item_is_named():
    with rm.mapper(nap, replicas=1, compiled_graphs=True) as m:
        m.wait_ready(timeout=120)
        with pytest.raises(TypeError, match="item 1"):
            m.map([0, threading.Lock(), 0], batch_size=1)
        assert m.map([0], batch_size=1) == [(0, False)], "the graph still works after it"


async def async_nap(x):
    return x


@pytest.mark.parametrize("options, why", [
    ({"replicas": "actors"}, "auto replicas"),
    ({"replicas": "actor tuple"}, "auto replicas"),
    ({"concurrency": 2}, "concurrency=1"),
    ({"obj": async_nap}, "async target"),
    ({"env": rm.Env(name="compiled_detached", detached=True)}, "detached pool"),
    ({"on_cluster": True}, "not over Ray Client"),
])
def test_compiled_graphs_are_refused_where_they_cannot_serve(options, why):
    if options.get("replicas") in ("actors", "actor tuple"):
        actors = [ray.remote(num_cpus=0)(Sleeper).remote()]
        replicas = actors if options["replicas"] == "actors" else tuple(actors)
        options = {"replicas": replicas, "obj": Sleeper, "method": "nap"}
    obj = options.pop("obj", nap)
    env = options.setdefault("env", rm.Env(name="compiled_refused"))
    with pytest.raises(ValueError, match=f"compiled_graphs=True cannot be used here: .*{why}"):
        rm.mapper(obj, compiled_graphs=True, **options)
    with pytest.raises(ValueError):  # refused before any replica was made
        ray.get_actor(replica_name(env.name, 0), namespace=NAMESPACE)


class Sleeper:
    def nap(self, x):
        return nap(x)

    def on_main_thread(self) -> bool:
        return threading.current_thread() is threading.main_thread()

    def scaled(self, x, scale=1):
        return x * scale


def test_your_actors_cannot_join_a_compiled_mapper():
    actor = ray.remote(num_cpus=0)(Sleeper).remote()
    with rm.mapper(Sleeper, method="nap", replicas=1, compiled_graphs=True) as m:
        with pytest.raises(ValueError, match="compiled_graphs=True cannot be used here: .*auto "):
            m.add_replicas([actor])
        assert m.num_replicas == 1
    with pytest.raises(TypeError, match="compiled_graphs must be True or False"):
        rm.mapper(nap, compiled_graphs="yes")
    ray.kill(actor)


def test_broadcast_runs_on_the_thread_and_in_the_turn_of_the_mapped_calls():
    with rm.mapper(Sleeper, method="nap", replicas=2, compiled_graphs=True) as m:
        assert m.broadcast("on_main_thread") == [False, False], "even before they were ready"
        assert m.broadcast("scaled", 2, scale=3) == [6, 6]
        with pytest.raises(TypeError, match="missing 1 required positional argument"):
            m.broadcast("nap")
        assert m.map([0, 0], batch_size=1) == [(0, False), (0, False)]
    with rm.mapper(Sleeper, method="nap", replicas=1) as m:  # without it: the main thread
        assert m.broadcast("on_main_thread") == [True]


def put_in_a_list(x):
    return [ray.put(x)]


class ObjectRefCounter:
    """Its name holds "ObjectRef"; it holds no Ray reference."""

    def __init__(self, count: int) -> None:
        self.count = count


def look_alike(kind: str):
    """A result whose pickle holds the bytes ``ObjectRef`` (or ``ActorHandle``), or a real
    reference (``"ref"``)."""
    return {"tuple": ("ObjectRef", 1), "counter": ObjectRefCounter(2),
            "handle text": {"ActorHandle": "ray._raylet"}, "ref": [ray.put(3)]}[kind]


def test_a_result_holding_a_ray_reference_fails_its_item_over_a_graph():
    with rm.mapper(put_in_a_list, replicas=1, compiled_graphs=True) as m:
        results = m.map([1, 2], batch_size=1, return_exceptions=True)
        assert all(isinstance(error, TypeError) and "compiled graph cannot carry" in str(error)
                   for error in results), results
    with rm.mapper(put_in_a_list, replicas=1) as m:  # actor calls count the reference
        assert [ray.get(refs[0]) for refs in m.map([1, 2], batch_size=1)] == [1, 2]


def test_results_that_only_name_ray_references_are_values_over_a_graph():
    kinds = ["tuple", "counter", "handle text", "ref"]
    with rm.mapper(look_alike, replicas=1, compiled_graphs=True) as m:
        for batch_size in (1, len(kinds)):  # a call per item, and one call for all
            results = m.map(kinds, batch_size=batch_size, return_exceptions=True)
            assert results[0] == ("ObjectRef", 1), results
            assert type(results[1]).__name__ == "ObjectRefCounter" and results[1].count == 2
            assert results[2] == {"ActorHandle": "ray._raylet"}
            assert isinstance(results[3], TypeError), results
            assert "holds a Ray ObjectRef or actor handle" in str(results[3])
    with rm.mapper(look_alike, replicas=1) as m:  # actor calls: the same values, and the reference
        results = m.map(kinds, batch_size=len(kinds))
        assert results[0] == ("ObjectRef", 1) and results[1].count == 2
        assert results[2] == {"ActorHandle": "ray._raylet"}
        assert ray.get(results[3][0], timeout=60) == 3


EXITS_WITH_GRAPHS_OPEN = """
import ray, rhmapper as rm
ray.init(address="local", num_cpus=2, include_dashboard=False)
m = rm.mapper(abs, replicas=2, compiled_graphs=True)
print(m.map([-1, -2, -3], batch_size=1), flush=True)
"""


EXITS_WITH_A_CALL_RUNNING = """
import threading, time, ray, rhmapper as rm
ray.init(address="local", num_cpus=2, include_dashboard=False)
m = rm.mapper(time.sleep, replicas=1, compiled_graphs=True)
m.wait_ready(timeout=120)
threading.Thread(target=m.map, args=([600],), daemon=True).start()
time.sleep(2)
print("exiting", flush=True)
"""


def local_ray_driver(script: str) -> DriverProcess:
    """``script`` in a process of its own, which starts its own local Ray."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": REPO_DIR}
    env.pop("RAY_ADDRESS", None)
    return DriverProcess(script, env)


def test_a_driver_exits_at_once_while_a_replica_runs_a_call():
    driver = local_ray_driver(EXITS_WITH_A_CALL_RUNNING)
    try:
        assert driver.next_line(timeout=120) == "exiting"
        exit_started = time.monotonic()
        driver.finish(timeout=60)
        assert time.monotonic() - exit_started < 20, "exit waited for Ray's 30 s teardown"
    finally:
        driver.kill()


def test_a_driver_that_never_shuts_its_mapper_down_exits():
    driver = local_ray_driver(EXITS_WITH_GRAPHS_OPEN)
    try:
        assert driver.finish(timeout=180) == "[1, 2, 3]"
    finally:
        driver.kill()
