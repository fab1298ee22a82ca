"""One verb suite, run unchanged against every backend (issue 19): the mapper on the driver
(``local``), the mapper on the cluster (``on_cluster=True``), and one mapper over two clusters
(``replicas={"ray://a": 1, "ray://b": 1}``), as CPython runs one test body against every executor.

Each backend gets one mapper of `Worker` per module (two replicas, ``CPU=0.5`` each), shared by
the tests in the order they are written: the last one kills a replica. Executions are counted in
files the replicas append to (every backend's replicas run on this machine), so a test proves what
ran, not only what came back. The local and on-cluster mappers run on the session's Ray; the
multi-cluster one in this process too, over Ray Client to the module's two test heads (the
``heads`` fixture, started only when those tests run).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray

import rhmapper as rm
from tests.conftest import TESTS_RUNTIME_ENV
from tests.ray_head import wait_until

BACKENDS = ["local", "on_cluster", "multi_cluster"]
pytestmark = pytest.mark.heads  # multi_cluster runs on the session's heads


class Flaw(Exception):
    """The user's own exception type: it must leave a map as itself."""


def log_line(log: str | None, line: str) -> None:
    """Append one line to ``log`` (a file every replica of every backend can reach)."""
    if log:
        with open(log, "a") as file:
            file.write(f"{line}\n")


def first_time(marker_dir: str, key: str) -> bool:
    """True for the first caller with ``key`` (across replicas and processes), else False."""
    try:
        os.close(os.open(os.path.join(marker_dir, key), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


class Worker:
    """What each replica runs; every method but ``add`` is picked per map with ``method=``."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, x, y=0, scale=1, log=None):
        log_line(log, f"run {x}")
        return (x + y) * scale

    def jittery_square(self, x):
        time.sleep((x % 3) * 0.01)  # later items often finish first
        return x * x

    def flawed(self, x, bad):
        if x == bad:
            raise Flaw(f"bad item {x}")
        return x

    def nap(self, x, log):
        log_line(log, f"start {x}")
        time.sleep(x)
        log_line(log, f"end {x}")
        return x

    def fragile(self, x, log, markers):
        """Item 1 raises once, item 2 kills its replica once; both then succeed."""
        log_line(log, f"run {x}")
        if x == 1 and first_time(markers, "raised"):
            raise Flaw("first try of item 1")
        if x == 2 and first_time(markers, "died"):
            os._exit(1)
        return -x

    def bump(self, amount):
        self.total += amount
        return os.getpid(), self.total

    def actor_name(self):
        return ray.get_runtime_context().get_actor_name()


@dataclass
class Backend:
    """One backend's shared mapper and what it documents about itself."""

    name: str
    mapper: rm.Mapper
    spawns: bool
    """Whether ``spawn_map`` runs here (only ``on_cluster=True``; elsewhere it raises)."""


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    """A mapper of `Worker` with two replicas on one backend, shared by this module's tests."""
    request.getfixturevalue("ray_session")
    env = rm.Env(compute={"CPU": 0.5})
    if request.param == "multi_cluster":
        a, b = request.getfixturevalue("heads").live(2)
        # The heads' workers import this module by name, as the session's do.
        env = rm.Env(compute={"CPU": 0.5}, env_vars=TESTS_RUNTIME_ENV["env_vars"])
        m = rm.mapper(Worker, method="add", env=env,
                      replicas={a.client_address: 1, b.client_address: 1})
    else:
        m = rm.mapper(Worker, method="add", replicas=2, env=env,
                      on_cluster=request.param == "on_cluster")
    try:
        m.wait_ready(timeout=120)
        yield Backend(request.param, m, spawns=request.param == "on_cluster")
    finally:
        m.shutdown()  # again, for the multi-cluster one: the last test shut it down


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_map_keeps_order_under_every_batch_size(backend):
    m = backend.mapper
    for batch_size in (1, 7, "auto"):
        assert m.map(range(60), method="jittery_square", batch_size=batch_size) == \
            [x * x for x in range(60)], batch_size
    assert m.map([]) == []


def test_map_kwargs_and_several_iterables(backend, tmp_path):
    m, log = backend.mapper, tmp_path / "runs.log"
    assert m.map([1, 2, 3], kwargs={"scale": 10, "log": str(log)}) == [10, 20, 30]
    assert sorted(lines(log)) == ["run 1", "run 2", "run 3"], "each item ran once"
    assert m.map([1, 2], [30, 40], kwargs={"scale": 2}) == [62, 84]
    with pytest.raises(ValueError, match="unequal lengths"):
        m.map([1, 2], [3])


def test_starmap(backend):
    m = backend.mapper
    assert m.starmap([(1, 2), (3, 4), (5,)]) == [3, 7, 5]
    assert m.starmap([(1, 2), (3, 4)], kwargs={"scale": -1}, batch_size=1) == [-3, -7]


def test_user_exception_keeps_its_type_and_gets_a_note(backend):
    m = backend.mapper
    with pytest.raises(Flaw, match="bad item 3") as caught:
        m.map(range(6), method="flawed", kwargs={"bad": 3}, batch_size=2)
    note = caught.value.__notes__[-1]
    assert note.startswith("rhmapper: item 3 failed on replica "), note
    assert note.rsplit(" ", 1)[-1] in m.replica_names, (note, m.replica_names)
    traceback = "\n".join(caught.value.__notes__[:-1])
    assert "Remote traceback" in traceback and "in flawed" in traceback, traceback


def test_return_exceptions_puts_the_users_exception_in_place(backend):
    values = backend.mapper.map(range(6), method="flawed", kwargs={"bad": 3},
                                return_exceptions=True)
    assert values[:3] == [0, 1, 2] and values[4:] == [4, 5], values
    assert type(values[3]) is Flaw and str(values[3]) == "bad item 3"
    assert values[3].__notes__[-1].startswith("rhmapper: item 3 failed on replica ")
    with pytest.raises(TypeError, match="unknown map option 'retry'"):
        backend.mapper.map([1], retry=2)


def test_imap_is_ordered_and_lazy(backend):
    m = backend.mapper
    assert list(m.imap(range(50), method="jittery_square", batch_size=1, window=8)) == \
        [x * x for x in range(50)]
    assert list(m.imap([1, 2], [10, 20])) == [11, 22]


def test_leaving_an_imap_early_ends_its_map(backend, tmp_path):
    m, log = backend.mapper, tmp_path / "runs.log"
    pulled = []

    def endless():
        for x in range(10**6):
            pulled.append(x)
            yield x

    results = m.imap(endless(), batch_size=1, window=4, kwargs={"log": str(log)})
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()
    read = list(pulled)
    assert len(read) <= 3 + 4, f"at most window=4 items pulled beyond those yielded: {read}"
    time.sleep(0.5)  # an ended map that still ran would pull and start items by now
    assert pulled == read, "no input pulled after the close"
    ran = collections.Counter(lines(log))
    assert set(ran) <= {f"run {x}" for x in read} and max(ran.values()) == 1, ran


def test_imap_unordered_yields_the_same_multiset(backend):
    m = backend.mapper
    inputs = [3, -3, 2, 2, 0, 5, -5, 1] * 4
    values = list(m.imap_unordered(inputs, method="jittery_square", batch_size=1))
    assert collections.Counter(values) == collections.Counter(x * x for x in inputs)


def test_call_runs_once(backend, tmp_path):
    log = tmp_path / "runs.log"
    assert backend.mapper.call(2, 3, scale=10, log=str(log)) == 50
    assert lines(log) == ["run 2"]


def test_broadcast_reaches_each_replica_once_in_order(backend):
    m = backend.mapper
    before = m.broadcast("bump", 0)
    after = m.broadcast("bump", 5)
    assert len(after) == m.num_replicas == 2
    assert [pid for pid, _ in after] == [pid for pid, _ in before]
    assert len({pid for pid, _ in after}) == 2, "two replicas, two processes"
    assert [total for _, total in after] == [total + 5 for _, total in before], "once each"
    assert m.broadcast("actor_name") == m.replica_names, "in replica order"
    # The state a broadcast left is what the next map's calls see (one item per idle replica).
    assert sorted(m.map([0, 0], method="bump", batch_size=1)) == sorted(after)


def test_spawn_map_where_the_backend_supports_it(backend):
    m = backend.mapper
    name = f"test_verbs_{backend.name}"
    if not backend.spawns:
        with pytest.raises(rm.RhmapperError, match=r"on_cluster=True"):
            m.spawn_map([1, 2], name=name)
        return
    spawned = m.spawn_map(range(20), name=name, kwargs={"scale": 3}, batch_size=1)
    assert rm.get_map(name).results(delete=False) == [3 * x for x in range(20)]
    assert spawned.status() == rm.MapStatus(20, 20, 0, "done")
    assert spawned.results() == [3 * x for x in range(20)]
    with pytest.raises(KeyError, match=f"no spawned map named '{name}'"):
        rm.get_map(name)


def test_cancel_ends_a_running_map_and_starts_nothing_queued(backend, tmp_path):
    m, log = backend.mapper, tmp_path / "naps.log"
    outcome: list = []

    def run():
        try:
            outcome.append(m.map([2.5] * 8, method="nap", batch_size=1,
                                 kwargs={"log": str(log)}))
        except BaseException as error:  # noqa: BLE001 - the test reads it below
            outcome.append(error)

    mapping = threading.Thread(target=run, daemon=True)
    mapping.start()
    assert wait_until(lambda: len(lines(log)) == 2, seconds=60), "both replicas busy"
    m.cancel()
    started = time.monotonic()
    mapping.join(30)
    assert not mapping.is_alive() and time.monotonic() - started < 1.8, \
        "cancel does not wait for the running items (2.5 s each, begun at most 0.4 s before)"
    assert len(outcome) == 1 and isinstance(outcome[0], rm.MapCancelledError), outcome
    assert wait_until(lambda: sum(line.startswith("end") for line in lines(log)) == 2,
                      seconds=30), lines(log)
    time.sleep(0.5)  # a queued call would have started once its replica was free
    assert sorted(lines(log)) == ["end 2.5"] * 2 + ["start 2.5"] * 2, \
        "no item queued behind the cancel started"
    assert m.map(range(4), kwargs={"scale": 3}) == [0, 3, 6, 9], "later maps are not cancelled"


def test_retries_and_a_dying_replica(backend, tmp_path):
    """It kills a replica (replaced at once, at the same place in the pool)."""
    m, log = backend.mapper, tmp_path / "runs.log"
    markers = tmp_path / "markers"
    markers.mkdir()
    values = m.map(range(6), method="fragile", retries=1, batch_size=1,
                   kwargs={"log": str(log), "markers": str(markers)})
    assert values == [-x for x in range(6)]
    runs = collections.Counter(lines(log))
    assert runs == {"run 0": 1, "run 1": 2, "run 2": 2, "run 3": 1, "run 4": 1, "run 5": 1}, runs
    assert wait_until(lambda: m.num_replicas == 2, seconds=60)
    assert m.map(range(4), kwargs={"scale": 2}) == [0, 2, 4, 6]


@ray.remote(num_cpus=0)
def node_and_square(x: int) -> tuple[str, int]:
    return ray.get_runtime_context().get_node_id(), x * x


def test_shutdown_gives_the_process_back_its_own_ray(backend, request):
    """A driver with a local Ray that also ran a mapper over several clusters has its own Ray
    again once that mapper is shut down: ``ray.is_initialized()`` and its tasks run on the
    session's Ray, not over Ray Client. A Ray Client connection of the user's own stays open
    until the user closes it, and a mapper whose creation fails after it connected (no node can
    host its replicas) leaves no connection open either."""
    if backend.name != "multi_cluster":
        pytest.skip("only a mapper over several clusters opens Ray Client connections")
    m = backend.mapper
    mine = ray.init(m.clusters[0], allow_multiple=True, log_to_driver=False,
                    runtime_env=TESTS_RUNTIME_ENV)
    with mine:
        remote_node, _ = ray.get(node_and_square.remote(2), timeout=60)
    m.shutdown()  # the last test of this backend: every multi-cluster mapper ends
    with mine:  # the user's own connection is the user's to close
        assert ray.get(node_and_square.remote(3), timeout=60) == (remote_node, 9)
    mine.disconnect()
    assert ray.is_initialized(), "the session's local Ray is this process's Ray again"
    local_node = ray.get_runtime_context().get_node_id()
    assert ray.get(node_and_square.remote(4), timeout=60) == (local_node, 16)
    assert local_node != remote_node
    assert ray.util.client.num_connected_contexts() == 0, "no Ray Client connection is left"

    env = rm.Env(compute={"CPU": 64}, env_vars=TESTS_RUNTIME_ENV["env_vars"])
    with pytest.raises(rm.UnschedulableError, match="CPU=64"):
        rm.mapper(Worker, method="add", env=env, replicas=dict.fromkeys(m.clusters, 1))
    assert ray.util.client.num_connected_contexts() == 0, "the failed mapper closed its own"
    assert ray.is_initialized()
    assert ray.get(node_and_square.remote(5), timeout=60) == (local_node, 25)
